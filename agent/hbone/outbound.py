"""The source node's side: captured pod connections tunnelled over pooled HBONE connections.

A pod's connection to a destination in a peer node's pod CIDR reaches the capture listener (the TC program's
PROXY verdict assigns it; getsockname() is the original destination). The source pod's address names its
workload identity; the pool holds one mTLS h2 connection per (source identity, peer node), as ztunnel's does,
carrying one CONNECT stream per tunnel, and opens another only when the peer's MAX_CONCURRENT_STREAMS is
reached or the identity's certificate was renewed. The pod's bytes are read only after the peer answered 200.
TLS is the TLS engine's (agent/tls/); no SNI is sent (the peer is an address; ztunnel sends none either).
"""

from __future__ import annotations

import asyncio
import logging
import socket

from OpenSSL import SSL

from planemesh.agent.hbone.certs import CertSource
from planemesh.agent.hbone.conn import HboneConnection, TcpSide
from planemesh.agent.hbone.inbound import HANDSHAKE_TIMEOUT_S, spiffe_peer
from planemesh.agent.hbone.listeners import bind_capture
from planemesh.agent.hbone.protocol import connect_headers
from planemesh.agent.hbone.routes import Peer, Routes
from planemesh.agent.hbone.stats import UNKNOWN_PEER, HboneStats
from planemesh.agent.tls.transport import open_tls

log = logging.getLogger("planemesh.hbone")
CONNECT_TIMEOUT_S = 10.0  # TCP + TLS to the peer node
RESPONSE_TIMEOUT_S = 10.0  # the peer's answer to CONNECT (it dials the pod within 5 s)
IDLE_RELEASE_S = 300.0  # a pooled connection without streams is closed after this (ztunnel's
# POOL_UNUSED_RELEASE_TIMEOUT default)


class PeerRefused(ConnectionError):
    """The peer node's certificate verified but is not the identity configured for it."""


class Pool:
    def __init__(self, certs: CertSource, stats: HboneStats) -> None:
        self.certs, self.stats = certs, stats
        self.conns: dict[tuple[str, tuple[str, int]], list[tuple[SSL.Context, HboneConnection]]] = {}
        self.connecting: dict[tuple[str, tuple[str, int]], asyncio.Future[HboneConnection]] = {}

    def _usable(self, key: tuple[str, tuple[str, int]], ctx: SSL.Context) -> HboneConnection | None:
        for held_ctx, conn in self.conns.get(key, ()):
            if held_ctx is ctx and conn.can_open():
                return conn
        return None

    async def get(self, identity: str, peer: Peer) -> HboneConnection:
        key = (identity, peer.address)
        ctx = self.certs.client_context(identity)
        while True:
            conn = self._usable(key, ctx)
            if conn is not None:
                return conn
            pending = self.connecting.get(key)
            if pending is None:
                break
            try:
                conn = await asyncio.shield(pending)  # one handshake per key at a time (single flight)
            except (OSError, PeerRefused):
                pass
            if conn is not None and conn.can_open():
                return conn
        fut: asyncio.Future[HboneConnection] = asyncio.get_running_loop().create_future()
        self.connecting[key] = fut
        try:
            conn = await self._connect(ctx, peer)
        except BaseException as exc:
            fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError("cancelled"))
            fut.exception()  # retrieved: waiters handle it themselves
            raise
        finally:
            self.connecting.pop(key, None)
        fut.set_result(conn)
        entry = (ctx, conn)
        self.conns.setdefault(key, []).append(entry)
        conn.on_lost = lambda _c: self._drop(key, entry)
        return conn

    async def _connect(self, ctx: SSL.Context, peer: Peer) -> HboneConnection:
        loop = asyncio.get_running_loop()
        host, port = peer.address
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            transport, conn = await open_tls(
                loop, host, port, lambda: HboneConnection(client_side=True), ctx, None, HANDSHAKE_TIMEOUT_S
            )
        got = spiffe_peer(transport)
        if peer.identity is not None and got != peer.identity:
            transport.abort()
            raise PeerRefused(f"peer {peer.name} presented {got}, expected {peer.identity}")
        conn.peer_identity = got
        self.stats.connections_out += 1
        self.stats.peer_out(peer.name).connections += 1
        return conn

    def _drop(self, key: tuple[str, tuple[str, int]], entry: tuple[SSL.Context, HboneConnection]) -> None:
        held = self.conns.get(key, [])
        if entry in held:
            held.remove(entry)
        if not held:
            self.conns.pop(key, None)

    def release_idle(self, now: float, idle_s: float = IDLE_RELEASE_S) -> int:
        """Close pooled connections that carried no stream for `idle_s` (loop time `now`); how many."""
        released = 0
        for held in list(self.conns.values()):
            for _, conn in list(held):
                if not conn.streams and now - conn.last_active >= idle_s:
                    conn.close()  # GOAWAY, then on_lost drops it from the pool
                    released += 1
        return released

    def close(self) -> None:
        for held in list(self.conns.values()):
            for _, conn in held:
                conn.close()


class CapturedSide(TcpSide):
    def __init__(self, outbound: Outbound) -> None:
        super().__init__()
        self.outbound = outbound

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]  # nothing is read before the peer said 200
        self.outbound.accepted(self)


class Outbound:
    def __init__(self, routes: Routes, pool: Pool, stats: HboneStats) -> None:
        self.routes, self.pool, self.stats = routes, pool, stats
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.sweeper: asyncio.Task[None] | None = None

    async def start(self, port: int, sock: socket.socket | None = None) -> asyncio.Server:
        """Serve on `sock` (inherited from the agent, agent/hbone/listeners.py) or a new capture socket."""
        if sock is None:
            sock = bind_capture(port)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: CapturedSide(self), sock=sock)
        self.sweeper = loop.create_task(self._sweep())
        return self.server

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(IDLE_RELEASE_S / 10)
            self.pool.release_idle(loop.time())

    def accepted(self, side: CapturedSide) -> None:
        self.stats.captured += 1
        assert side.transport is not None
        dst_ip, dst_port = side.transport.get_extra_info("sockname")[:2]  # the original destination
        src_ip = side.transport.get_extra_info("peername")[0]
        task = asyncio.get_running_loop().create_task(self.tunnel(side, src_ip, dst_ip, dst_port))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def tunnel(self, side: TcpSide, src_ip: str, dst_ip: str, dst_port: int) -> None:
        """Carry `side` (connected, not being read) to dst over HBONE, or close it."""
        peer = self.routes.peer_for(dst_ip)
        identity = self.routes.identity_of(src_ip)
        reason = "no_route" if peer is None else "unknown_source" if identity is None else ""
        if peer is None or identity is None:
            self._refuse(side, reason, f"{src_ip} -> {dst_ip}:{dst_port}", peer.name if peer else UNKNOWN_PEER)
            return
        try:
            conn = await self.pool.get(identity, peer)
            async with asyncio.timeout(RESPONSE_TIMEOUT_S):
                status = await conn.open_stream(connect_headers(dst_ip, dst_port, src_ip), side)
        except (OSError, TimeoutError, PeerRefused) as exc:  # TLS failures are ConnectionErrors (TlsFailure)
            self._refuse(side, "connect_failed", f"{identity} -> {peer.name} {peer.address}: {exc}", peer.name)
            return
        if status != 200:
            self._refuse(side, f"status_{status}", f"{identity} -> {dst_ip}:{dst_port} via {peer.name}", peer.name)
            return
        self.stats.tunnels_out += 1
        self.stats.peer_out(peer.name).streams += 1
        name = peer.name
        side.on_close = lambda s, _exc: self._closed(s, name)
        side.start()

    def _closed(self, side: TcpSide, peer: str) -> None:
        self.stats.bytes_up += side.bytes_up  # from the pod into the tunnel
        self.stats.bytes_down += side.bytes_down
        counters = self.stats.peer_out(peer)
        counters.bytes_sent += side.bytes_up
        counters.bytes_received += side.bytes_down

    def _refuse(self, side: TcpSide, reason: str, what: str, peer: str) -> None:
        self.stats.refuse_out(reason, peer)
        log.info("HBONE outbound %s refused: %s", what, reason)
        if side.conn is not None:
            side.conn.reset_stream(side.stream_id)
            side.conn = None
        if side.transport is not None:
            side.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.sweeper is not None:
            self.sweeper.cancel()
        for task in list(self.tasks):
            task.cancel()
        self.pool.close()
