"""The sniffing listener of a plane and the opaque TCP passthrough it falls back to.

Connections to undeclared ports arrive here. We peek (MSG_PEEK: nothing is consumed) until sniff.classify()
decides, or until `timeout_s` passes without a decision (server-first protocols such as SMTP, MySQL, SSH send
nothing first). HTTP/1.x goes to the same Downstream as declared ports, h2 prior knowledge to the h2 path, TLS
and everything else is copied byte for byte to the original destination (SNI and ALPN counted).

Peeking again only when *more* bytes arrived: SO_RCVLOWAT is raised to one byte above what was already seen,
so readiness does not fire again for the same bytes (no busy loop). A readiness event that brings no new
byte means the client half-closed: decide now.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from planemesh.agent.proxy.balancer import normalise_ip
from planemesh.agent.proxy.circuit import CONNECTIONS
from planemesh.agent.proxy.istio_stats import exact_spiffe
from planemesh.agent.proxy.sniff import MAX_PEEK, OPAQUE, Kind, Verdict, classify
from planemesh.agent.proxy.sniff_tls import mtls_decision, plane_refuses, terminate_and_sniff
from planemesh.agent.proxy.sockets import open_upstream
from planemesh.agent.proxy.tcp_authz import tcp_denial
from planemesh.agent.proxy.tcp_local import local_server_refuses
from planemesh.agent.proxy.tcp_originate import TcpOriginStats, TlsUpstream, attach, origin_tls, originate
from planemesh.agent.proxy.tcp_tls import TcpRecord, TlsDownstream, terminate
from planemesh.agent.proxy.tcp_upstream import NO_UPSTREAM, pick_upstream

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import Proxy as PlaneProxy
    from planemesh.agent.proxy.routing_table import RoutingTable
    from planemesh.agent.proxy.sni_routing import PassthroughChain
    from planemesh.agent.proxy.tls import TlsDecision

log = logging.getLogger("planemesh.proxy.tls")
MAX_SNI_NAMES = 1024  # distinct SNI names counted; the rest are counted under "(other)"
DEFAULT_SNIFF_TIMEOUT_S = 0.3
# Outlier detection outcome of a passthrough connection that was established (balancer.report's HTTP-status
# scale: below 500 is a success, 0 a gateway failure).
CONNECTED = 200


class SniffStats:
    """Counters of the sniffing listener: verdicts, SNI names, passthrough connections and bytes."""

    __slots__ = (
        "alpn",
        "bytes_down",
        "bytes_up",
        "connect_failures",
        "inner_kinds",
        "kinds",
        "no_upstream",
        "origin",
        "passthrough_active",
        "passthrough_total",
        "routed",
        "silent_clients",
        "sni",
    )

    def __init__(self) -> None:
        self.kinds: dict[str, int] = {k.value: 0 for k in Kind}
        self.inner_kinds: dict[str, int] = {k.value: 0 for k in Kind}  # inside terminated mTLS (sniff_tls.py)
        self.sni: dict[str, int] = {}
        self.alpn: dict[str, int] = {}
        self.silent_clients = 0  # nothing sent first within the timeout (server-first protocols)
        self.passthrough_active = 0
        self.passthrough_total = 0
        self.connect_failures = 0
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self.routed: dict[str, dict[str, int]] = {}  # filter chain -> SNI ("(none)": no SNI) -> connections
        self.no_upstream = 0  # a chain's cluster had no endpoint or its connection breaker was full
        self.origin = TcpOriginStats()  # TLS originated to the chain's endpoints (tcp_originate.py)

    def record(self, verdict: Verdict) -> None:
        self.kinds[verdict.kind.value] += 1
        if verdict.kind is Kind.TLS:
            name = verdict.sni or "(none)"
            if name not in self.sni and len(self.sni) >= MAX_SNI_NAMES:
                name = "(other)"
            self.sni[name] = self.sni.get(name, 0) + 1
            for proto in verdict.alpn[:4]:
                if proto in self.alpn or len(self.alpn) < 64:
                    self.alpn[proto] = self.alpn.get(proto, 0) + 1

    def record_route(self, chain: str, sni: str | None) -> None:
        names = self.routed.setdefault(chain, {})
        name = sni or "(none)"
        if name not in names and sum(map(len, self.routed.values())) >= MAX_SNI_NAMES:
            name = "(other)"
        names[name] = names.get(name, 0) + 1

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {name: getattr(self, name) for name in self.__slots__}
        out["routed"] = {chain: dict(names) for chain, names in self.routed.items()}
        out["origin"] = self.origin.as_dict()
        return {name: (dict(v) if isinstance(v, dict) else v) for name, v in out.items()}


async def peek_verdict(sock: socket.socket, timeout_s: float) -> Verdict:
    """Peek at a freshly accepted (non-blocking) socket until the classifier decides or time runs out."""
    loop = asyncio.get_running_loop()
    seen = b""
    deadline = loop.time() + timeout_s
    try:
        while True:
            try:
                data: bytes | None = sock.recv(MAX_PEEK, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                data = None  # nothing yet (the usual first peek: accepted before the request arrived)
            except OSError:
                return OPAQUE  # reset before deciding: the passthrough will fail fast too
            if data is not None:
                if not data:
                    return OPAQUE  # FIN without a byte
                if len(data) > len(seen):
                    seen = data
                    verdict = classify(data, final=len(data) >= MAX_PEEK)
                    if verdict is not None:
                        return verdict
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(data) + 1)
                elif _readable_now(sock):
                    return classify(data, final=True)  # readable without new bytes: the client sent FIN
            left = deadline - loop.time()
            if left <= 0 or not await _wait_readable(loop, sock.fileno(), left):
                return classify(seen, final=True)
    finally:
        if seen:  # SO_RCVLOWAT was raised: the L7 path or the copy loop wants every byte
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _readable_now(sock: socket.socket) -> bool:
    """A poll that ignores SO_RCVLOWAT's effect on data (FIN and errors still wake it)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def _settle(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


async def _wait_readable(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> bool:
    """True when `fd` became readable, False after `timeout` (a plain timer: lighter than asyncio.timeout's
    cancel scope on this once-per-connection path)."""
    fut: asyncio.Future[bool] = loop.create_future()
    loop.add_reader(fd, _settle, fut, True)
    timer = loop.call_later(timeout, _settle, fut, False)
    try:
        return await fut
    finally:
        timer.cancel()
        loop.remove_reader(fd)


class _Pipe(asyncio.Protocol):
    """One side of a byte tunnel: what it reads goes to its peer. Back-pressure: when our peer's write
    buffer is full we stop reading. Half-close: our EOF becomes the peer's write_eof(); closed when both
    directions ended."""

    __slots__ = ("count", "eof", "on_lost", "peer", "pending", "pending_eof", "transport")

    def __init__(self, count: Callable[[int], None], on_lost: Callable[[], None]) -> None:
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe = None  # type: ignore[assignment]
        self.count = count
        self.pending: list[bytes] = []  # read before the peer's transport existed
        self.pending_eof = False
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = self.peer
        if peer.pending:
            self.transport.write(b"".join(peer.pending))  # type: ignore[union-attr]
            peer.pending.clear()
        if peer.pending_eof:
            self._write_eof()

    def data_received(self, data: bytes) -> None:
        self.count(len(data))
        out = self.peer.transport
        if out is None:
            self.pending.append(data)
        else:
            out.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer.transport is None:
            self.pending_eof = True
        else:
            self.peer._write_eof()
        if self.peer.eof:
            self.close()
            self.peer.close()
        return True  # keep the other direction open

    def _write_eof(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:  # TLS has no half-close: close_notify once what is buffered is sent
            transport.close()

    def pause_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.peer.close()
        self.on_lost()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # flushes what is buffered first

    def adopt(self, transport: asyncio.Transport) -> None:
        """Take over a connected transport whose protocol is done with it (HTTP upgrades, CONNECT)."""
        transport.set_protocol(self)
        self.connection_made(transport)
        transport.resume_reading()


def pipe_pair(
    count_ab: Callable[[int], None], count_ba: Callable[[int], None], on_done: Callable[[], None]
) -> tuple[_Pipe, _Pipe]:
    """The two ends of a byte tunnel: what `a` reads goes to b's transport (counted by count_ab) and the other
    way round; on_done() runs once both are closed. Each end gets its transport from connection_made or adopt."""
    left = [2]

    def on_lost() -> None:
        left[0] -= 1
        if left[0] == 0:
            on_done()

    pa, pb = _Pipe(count_ab, on_lost), _Pipe(count_ba, on_lost)
    pa.peer, pb.peer = pb, pa
    return pa, pb


def reset(sock: socket.socket) -> None:
    """Close with RST: the client sees the failure as the upstream's (refused/reset), not as an empty reply."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def splice_sockets(
    a: socket.socket, b: socket.socket | TlsUpstream, count_ab: Callable[[int], None],
    count_ba: Callable[[int], None],
) -> asyncio.Future[None]:  # fmt: skip
    """Copy bytes both ways between two connected sockets (`b` may be an originated TLS connection) until both
    directions ended. Returns a future that completes when both are closed."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    pa, pb = pipe_pair(count_ab, count_ba, lambda: done.done() or done.set_result(None))
    try:
        await attach(b, pb)
    except BaseException:
        a.close()
        b.close()
        raise
    try:
        await loop.connect_accepted_socket(lambda: pa, a)
    except BaseException:
        a.close()
        pb.close()
        raise
    return done


async def relay_tls(
    down: TlsDownstream, up: socket.socket | TlsUpstream, count_up: Callable[[int], None],
    count_down: Callable[[int], None],
) -> asyncio.Future[None]:  # fmt: skip
    """splice_sockets for a client whose TLS this proxy terminated (agent/proxy/tcp_tls.py)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    pa, pb = pipe_pair(count_up, count_down, lambda: done.done() or done.set_result(None))
    try:
        await attach(up, pb)
    except BaseException:
        up.close()
        down.refuse()
        raise
    down.adopt_into(pa)
    return done


class SniffListener:
    """Accepts on a plane's sniff port and dispatches each connection by its first bytes."""

    def __init__(self, proxy: PlaneProxy, sock: socket.socket, timeout_s: float = DEFAULT_SNIFF_TIMEOUT_S) -> None:
        self.proxy = proxy
        self.sock = sock
        self.timeout_s = timeout_s
        self.stats: SniffStats = proxy.sniff_stats
        self.tasks: set[asyncio.Task] = set()
        self.closed = False

    async def serve(self) -> None:
        loop = self.proxy.loop
        try:
            while not self.closed:
                try:
                    conn, _ = await loop.sock_accept(self.sock)
                except OSError:
                    if self.closed:
                        return
                    await asyncio.sleep(0.01)  # EMFILE and friends: do not spin
                    continue
                conn.setblocking(False)
                task = loop.create_task(self.handle(conn))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        finally:
            self.close()

    def close(self) -> None:
        self.closed = True
        for task in list(self.tasks):
            task.cancel()

    async def handle(self, conn: socket.socket) -> None:
        proxy = self.proxy
        try:
            verdict = await peek_verdict(conn, self.timeout_s)
            peer = conn.getpeername()
            dst = proxy.original_destination(conn.getsockname(), peer)
        except OSError:
            conn.close()  # the client is gone already
            return
        except BaseException:
            conn.close()
            raise
        if verdict.kind is Kind.OPAQUE and not _has_bytes(conn):
            self.stats.silent_clients += 1
        self.stats.record(verdict)
        table = proxy.table  # one snapshot for the whole connection
        src = normalise_ip(peer[0])  # the client's address, read once for the whole connection
        owned = table.sni.declares(dst[1], src)  # a tcp_proxy chain for this client owns the port
        decision = None if owned else mtls_decision(table, dst, verdict)
        if decision is not None:  # Istio's mTLS on a sniffed port: terminated, then sniffed inside
            await self._terminate(conn, decision, dst, src)
            return
        # the plane's mode: "" for an OUTBOUND listener's destination (a pod's egress)
        if not owned and plane_refuses(
            proxy.tls_stats, table.tls.mode_for(*dst), verdict, src, dst[1]
        ):
            reset(conn)  # a strict plane: no handshake, nothing sniffed or relayed
            return
        # HTTP goes to the L7 proxy, unless a tcp_proxy chain owns the port (declared TCP, sniffed for its SNI).
        if verdict.kind is Kind.HTTP1 and not owned:
            await proxy.loop.connect_accepted_socket(proxy.http1_protocol, conn)
            return
        if verdict.kind is Kind.H2 and not owned:
            await proxy.loop.connect_accepted_socket(proxy.h2_protocol, conn)
            return
        await self.passthrough(conn, verdict, table, dst, src)

    async def _terminate(self, conn: socket.socket, decision: TlsDecision, dst: tuple[str, int], src: str) -> None:
        proxy = self.proxy
        if proxy.open_connections() >= proxy.sla.max_connections:  # handshakes cost CPU: refuse before one
            proxy.tls_stats.overloaded += 1
            reset(conn)
            return

        def relay(down: TlsDownstream) -> None:
            task = proxy.loop.create_task(self._relay_decrypted(down, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        await terminate_and_sniff(proxy, conn, decision, src, self.timeout_s, relay)

    async def _relay_decrypted(self, down: TlsDownstream, dst: tuple[str, int]) -> None:
        """Not HTTP inside terminated mTLS: the decrypted bytes go to the original destination (istio's TCP
        chain: tcp_proxy to the inbound cluster, i.e. the local application)."""
        proxy, stats = self.proxy, self.stats
        host, port = normalise_ip(dst[0]), dst[1]
        if port in proxy.listen_ports:
            down.refuse()  # not intercepted: it would loop back into us
            return
        source, mark = proxy.upstream_binding(host)
        try:
            up = await open_upstream(host, port, mark=mark, source=source, timeout=proxy.sla.connect_timeout_s)
        except (OSError, TimeoutError):
            stats.connect_failures += 1
            down.refuse()
            return
        stats.passthrough_active += 1
        stats.passthrough_total += 1
        try:
            await (await relay_tls(down, up, self._count_up, self._count_down))
        finally:
            stats.passthrough_active -= 1

    async def passthrough(
        self, conn: socket.socket, verdict: Verdict, table: RoutingTable, dst: tuple[str, int], src: str
    ) -> None:
        """Copy bytes to the chain's cluster (sni_routing.py), else to the original destination; the chain may
        first terminate TLS (tcp_tls.py) and authorize the connection (tcp_authz.py)."""
        proxy = self.proxy
        stats = self.stats
        host, port = normalise_ip(dst[0]), dst[1]
        admitted = await self._admit(conn, verdict, table, (host, port), src)
        if admitted is None:
            return
        chain, down = admitted
        refuse = down.refuse if down is not None else functools.partial(reset, conn)
        if chain is not None:
            stats.record_route(chain.name, verdict.sni)
        picked = pick_upstream(table.balancer, chain, (host, port), proxy.listen_ports)  # tcp_upstream.py
        if type(picked) is str:
            stats.no_upstream += picked == NO_UPSTREAM
            refuse()
            return
        cluster, ep, breaker, (host, port) = picked
        balancer = table.balancer
        timeout = cluster.connect_timeout_s if cluster is not None else None
        timeout = timeout if timeout is not None else proxy.sla.connect_timeout_s
        source, mark = proxy.upstream_binding(host)
        origin = origin_tls(cluster, ep, (host, port))  # the endpoint's transport socket (tcp_originate.py)
        outcome = -1
        try:
            if ep is not None and local_server_refuses(proxy, src, chain, table, verdict, (host, port)):
                refuse()  # by the local server pod's inbound chain (tcp_local.py); the endpoint is given back below
                return
            try:
                up = await open_upstream(host, port, mark=mark, source=source, timeout=timeout)
                if origin is not None:  # TLS refused (counted, logged): the client is closed, as a refused connect
                    up = await originate(proxy, up, origin, timeout, stats.origin, (host, port))
            except (OSError, TimeoutError):
                stats.connect_failures += 1
                outcome = 0
                refuse()
                return
            except BaseException:
                refuse()
                raise
            outcome = CONNECTED
            stats.passthrough_active += 1
            stats.passthrough_total += 1
            row = self._istio_row(cluster, chain, down, origin)
            count_up, count_down = self._counters(row)
            tally = [0, 0]  # this connection's bytes from / to the client (the TLS chains' access log)
            t0 = time.time()
            try:
                if down is None:
                    done = await splice_sockets(conn, up, count_up, count_down)
                else:
                    done = await relay_tls(down, up, _tallied(count_up, tally, 0), _tallied(count_down, tally, 1))
                await done
            finally:
                stats.passthrough_active -= 1
                if row is not None:
                    row.closed += 1
                if down is not None:  # a line per relayed mTLS connection, with the client's SPIFFE ID
                    ms = int((time.time() - t0) * 1000)
                    proxy.log.append(TcpRecord(t0, tally[0], tally[1], ms, f"{host}:{port}", proxy.plane_name, down))
        finally:
            if ep is not None and cluster is not None and breaker is not None:
                breaker.release(CONNECTIONS)
                balancer.report(cluster, ep, outcome)

    async def _admit(
        self, conn: socket.socket, verdict: Verdict, table: RoutingTable, dst: tuple[str, int], src: str
    ) -> tuple[PassthroughChain | None, TlsDownstream | None] | None:
        """The connection's chain, its TLS terminated when the chain says so, authorized by its network RBAC;
        None when it was refused (closed, counted, logged)."""
        proxy = self.proxy
        is_tls = verdict.kind is Kind.TLS
        chain = table.sni.select(dst[1], dst[0], verdict.sni, is_tls, verdict.alpn, src or None)
        if chain is None:  # not HTTP on an auto-protocol port: its TCP chain's cluster (sni_routing.py)
            chain = table.sni.behind_http(dst[1], dst[0], src or None)
        if chain is None and table.sni.guarded(dst[1], src or None):  # no chain for it: refused, as Envoy does
            if not is_tls and table.sni.terminates_tls(dst[1], src or None):
                proxy.tls_stats.plaintext_refused += 1
                log.info("%s: plaintext on TLS-only port %s: closed", src, dst[1])
            else:
                self.stats.no_upstream += 1
            reset(conn)
            return None
        down = None
        if chain is not None and chain.tls is not None:
            if proxy.open_connections() >= proxy.sla.max_connections:  # handshakes cost CPU: refuse before one
                proxy.tls_stats.overloaded += 1
                reset(conn)
                return None
            proxy.tls_pending += 1  # a handshake in progress holds a place in the plane's budget
            try:
                down = await terminate(proxy, conn, chain.tls, src, dst[1])
            finally:
                proxy.tls_pending -= 1
            if down is None:
                return None
        if chain is not None and chain.rbac:
            peer = down.peer if down is not None else None
            if peer is None and src:  # a same-node client pod: its SPIFFE ID from the pod table (docs/workloads.md)
                peer = table.router.pods.principal(src)
            if tcp_denial(proxy, chain.name, chain.rbac, src, dst, peer) is not None:  # type: ignore[arg-type]
                down.refuse() if down is not None else reset(conn)
                return None
        return chain, down

    def _istio_row(
        self, cluster: Any, chain: PassthroughChain | None, down: TlsDownstream | None, origin: Any = None
    ) -> Any:
        """istio_tcp_* for istiod-named clusters, with the client's identity on a terminated mTLS chain, or ours
        and the server's (the SAN the cluster required) on originated mTLS (tcp_originate.py)."""
        if cluster is None:
            return None
        src = dst = None
        if down is not None and chain is not None and chain.tls is not None:
            src, dst = down.peer, self.proxy.istio.our_uri(self.proxy, chain.tls)
        elif origin is not None:
            src, dst = self.proxy.istio.our_uri(self.proxy, origin), exact_spiffe(origin)
        return self.proxy.istio.tcp(cluster.name, src, dst)

    def _counters(self, row: Any) -> tuple[Callable[[int], None], Callable[[int], None]]:
        if row is None:
            return self._count_up, self._count_down

        def up(n: int) -> None:
            self.stats.bytes_up += n
            row.received += n

        def down(n: int) -> None:
            self.stats.bytes_down += n
            row.sent += n

        return up, down

    def _count_up(self, n: int) -> None:
        self.stats.bytes_up += n

    def _count_down(self, n: int) -> None:
        self.stats.bytes_down += n


def _tallied(count: Callable[[int], None], tally: list[int], i: int) -> Callable[[int], None]:
    def counted(n: int) -> None:
        count(n)
        tally[i] += n

    return counted


def _has_bytes(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False
