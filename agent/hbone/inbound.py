"""The destination node's HBONE listener (port 15008): mTLS with the node's certificate, h2, one CONNECT per
tunnel. Each CONNECT is parsed and decided (protocol.decide: local pod only, RBAC by the source workload's SPIFFE
ID), then the pod is dialled in plaintext and `200` is sent once it answered; a refusal is answered with its
status and the stream closes. A client certificate is required and must chain to our roots (TLS handshake
failure otherwise, counted `handshake_failed`) and carry exactly one SPIFFE ID. TLS is the TLS engine's
(agent/tls/), each accepted connection handshaking on the node certificate current at its accept.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from planemesh.agent.hbone.certs import CertSource
from planemesh.agent.hbone.conn import HboneConnection, TcpSide
from planemesh.agent.hbone.listeners import bind_listen
from planemesh.agent.hbone.protocol import Authorizer, HboneError, decide, parse_connect
from planemesh.agent.hbone.routes import Routes
from planemesh.agent.hbone.stats import UNKNOWN_PEER, HboneStats
from planemesh.agent.rbac import RbacFilter
from planemesh.agent.tls.engine import TlsPeerView, refusing_context
from planemesh.agent.tls.transport import tls_server_protocol

log = logging.getLogger("planemesh.hbone")
HANDSHAKE_TIMEOUT_S = 10.0  # as the proxy's TLS ports (agent/proxy/tls.py)
DIAL_TIMEOUT_S = 5.0  # destination pod connect; a refusal is 503
# Peer connections open at once: each carries up to conn.MAX_STREAMS tunnels. A node has one per (source
# identity, peer node) pair in the cluster; beyond this a new one is closed after its handshake.
MAX_CONNECTIONS = 4096


def spiffe_peer(transport: asyncio.BaseTransport) -> str | None:
    """The verified peer's one SPIFFE ID, else None."""
    view = transport.get_extra_info("ssl_object")
    uris, _ = view.sans() if isinstance(view, TlsPeerView) else ([], [])
    ids = [u for u in uris if u.startswith("spiffe://")]
    return ids[0] if len(ids) == 1 else None


class InboundConnection(HboneConnection):
    def __init__(self, inbound: Inbound) -> None:
        super().__init__(client_side=False, on_request=inbound.request)
        self.inbound = inbound
        self.peer_name = "-"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        self.peer_name = self.inbound.routes().peer_name(peername[0] if peername else None)
        if len(self.inbound.open) >= MAX_CONNECTIONS:
            self.inbound.stats.refuse_in("overloaded", self.peer_name)
            transport.abort()
            return
        self.inbound.stats.connections_in += 1
        self.inbound.stats.peer_in(self.peer_name).connections += 1
        self.peer_identity = spiffe_peer(transport)
        if self.peer_identity is None:
            self.inbound.stats.peer_refused += 1
            self.inbound.stats.refuse_in("peer_identity", self.peer_name)
            log.info("HBONE peer %s refused: no single SPIFFE ID", transport.get_extra_info("peername"))
            transport.abort()
            return
        self.inbound.open.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.inbound.open.discard(self)
        super().connection_lost(exc)


class Inbound:
    def __init__(
        self, routes: Callable[[], Routes], rbacs: Callable[[], tuple[RbacFilter, ...]], certs: CertSource,
        stats: HboneStats, authz: Callable[[], Authorizer | None] = lambda: None,
    ) -> None:  # fmt: skip
        self.routes, self.rbacs, self.certs, self.stats = routes, rbacs, certs, stats
        self.authz = authz  # WDS Authorization policies (agent/hbone/authz.py), read per CONNECT
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.open: set[InboundConnection] = set()

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> asyncio.Server:
        """Serve on `sock` (inherited from the agent, agent/hbone/listeners.py) or a new socket on host:port."""
        if sock is None:
            sock = bind_listen(host, port)
        self.server = await asyncio.get_running_loop().create_server(self._accepted, sock=sock)
        return self.server

    def _accepted(self) -> asyncio.Protocol:
        """One accepted connection: its handshake on the node certificate current now (a renewed one serves the
        next handshake); without one (CreateCertificate not answered) it fails: fail closed."""
        try:
            ctx = self.certs.server_context()
        except OSError as exc:
            log.warning("HBONE listener has no node certificate: %s", exc)
            ctx = refusing_context()
        return tls_server_protocol(ctx, lambda: InboundConnection(self), HANDSHAKE_TIMEOUT_S, self._handshake_failed)

    def _handshake_failed(self, exc: BaseException, peername: Any) -> None:
        routes = self.routes()
        name = routes.peer_name(peername[0] if peername else None)
        # A configured peer by name; any other source as one row (a scan from many addresses adds no rows).
        peer = name if any(p.name == name for p in routes.peers) else UNKNOWN_PEER
        self.stats.refuse_in("handshake_failed", peer)
        log.info("HBONE handshake from %s failed: %s", peername, exc)

    def request(self, conn: HboneConnection, sid: int, headers: list) -> None:
        peer = getattr(conn, "peer_name", "-")
        try:
            req = parse_connect(headers)
        except HboneError as exc:
            self.stats.refuse_in("bad_request", peer)
            log.info("HBONE CONNECT from %s (%s) refused %d: %s", conn.peer_ip, conn.peer_identity, exc.status, exc)
            conn.respond(sid, exc.status, end=True)
            return
        assert conn.peer_identity is not None
        decision = decide(req, conn.peer_identity, conn.peer_ip, self.routes().workloads, self.rbacs(), self.authz())
        if decision.status != 200:
            self.stats.refuse_in(decision.reason, peer)
            log.info(
                "HBONE CONNECT %s from %s (%s) refused %d: %s%s", req.authority, conn.peer_ip, conn.peer_identity,
                decision.status, decision.reason, f", {decision.policy}" if decision.policy else "",
            )  # fmt: skip
            conn.respond(sid, decision.status, end=True)
            return
        side = TcpSide()
        side.on_open = lambda: self._opened(conn, sid, side, peer)
        side.on_close = lambda s, _exc: self._closed(conn, req.authority, s, peer)
        conn.attach(sid, side)
        task = asyncio.get_running_loop().create_task(self._dial(conn, sid, side, req.dst_ip, req.dst_port, peer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _opened(self, conn: HboneConnection, sid: int, side: TcpSide, peer: str) -> None:
        self.stats.tunnels_in += 1
        self.stats.peer_in(peer).streams += 1
        side.ready = True
        conn.respond(sid, 200, end=False)

    def _closed(self, conn: HboneConnection, authority: str, side: TcpSide, peer: str) -> None:
        self.stats.bytes_up += side.bytes_down  # from the tunnel to the pod
        self.stats.bytes_down += side.bytes_up
        counters = self.stats.peer_in(peer)
        counters.bytes_received += side.bytes_down
        counters.bytes_sent += side.bytes_up
        log.info(
            "HBONE tunnel %s <- %s (%s): %d bytes in, %d out", authority, conn.peer_ip, conn.peer_identity,
            side.bytes_down, side.bytes_up,
        )  # fmt: skip

    async def _dial(self, conn: HboneConnection, sid: int, side: TcpSide, ip: str, port: int, peer: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(DIAL_TIMEOUT_S):
                await loop.create_connection(lambda: side, ip, port)
        except (OSError, TimeoutError) as exc:
            self.stats.dial_failed += 1
            self.stats.refuse_in("dial_failed", peer)
            log.info("HBONE tunnel to %s:%d failed: %s", ip, port, exc)
            conn.streams.pop(sid, None)
            conn.respond(sid, 503, end=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
