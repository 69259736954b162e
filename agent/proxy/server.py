"""A plane's L7 proxy: the listening socket, the composition of routing, pool, limits, stats and log.

sock = make_listener_socket(plane.proxy_port)           # transparent, [::] dual-stack
proxy = PlaneProxy(snapshot, "oam", upstream_mark=0x100, source_address=pick_source, access_log=sink)
await proxy.serve(sock)         # until drain()
proxy.update(new_snapshot)      # atomic: requests already routed keep the old one
await proxy.drain(timeout=5)
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from planemesh.agent.proxy.accesslog import OM, AccessLogBuffer, Sink, format_json, format_text
from planemesh.agent.proxy.contracts import Timed
from planemesh.agent.proxy.dns import DnsRefresh
from planemesh.agent.proxy.dns_resolver import DnsResolver, Resolve, system_resolve
from planemesh.agent.proxy.downstream import Downstream
from planemesh.agent.proxy.exchange import Exchange
from planemesh.agent.proxy.h2_support import LazyH2Pool, h2_downstream
from planemesh.agent.proxy.istio_stats import IstioCounters
from planemesh.agent.proxy.limits import (
    MEMORY_SHED_BODY,
    REFUSED_CONNECTIONS,
    REFUSED_MEMORY,
    REFUSED_SOURCE,
    ClientConnection,
    ConnectionShare,
    TokenBucket,
    bucket_for,
)
from planemesh.agent.proxy.mirror import MirrorSender
from planemesh.agent.proxy.overload import SAMPLE_INTERVAL_S, SHED_HEADERS, Level, OverloadManager, RssGrowth
from planemesh.agent.proxy.passthrough import DEFAULT_SNIFF_TIMEOUT_S, SniffListener, SniffStats
from planemesh.agent.proxy.routing_table import RoutingTable
from planemesh.agent.proxy.sockets import SO_MARK, listen_backlog
from planemesh.agent.proxy.stats import PlaneStats
from planemesh.agent.proxy.tls import TlsStats, accept_factory
from planemesh.agent.proxy.upstream import UpstreamPool
from planemesh.ebpf.abi_marks import PM_MARK_PLANE_MASK  # not abi.py: its ctypes structs
from planemesh.model.config import Snapshot
from planemesh.model.ip import AddrFormatError
from planemesh.model.planes import plane_of_address

if TYPE_CHECKING:
    from planemesh.agent.proxy.h2_downstream import H2Downstream

# (sockname, peername) of an accepted connection -> its original destination (address, port).
OriginalDestination = Callable[[tuple, tuple], tuple[str, int]]


def _sockname_is_destination(sockname: tuple, peername: tuple) -> tuple[str, int]:
    return sockname[0], sockname[1]


DRAIN_IDLE_CLOSE_S = 0.5


class PlaneProxy:
    def __init__(
        self,
        snapshot: Snapshot,
        plane: str,
        *,
        upstream_mark: int = 0,
        source_address: Callable[[str], str | None] | None = None,
        access_log: Sink | None = None,
        log_format: str = "text",
        original_destination: OriginalDestination = _sockname_is_destination,
        clock: Callable[[], float] = time.monotonic,
        max_idle_per_key: int = 64,
        tick_s: float = 1.0,
        sniff_timeout_s: float = DEFAULT_SNIFF_TIMEOUT_S,
        memory_source: Callable[[], int] | None = None,  # default: RSS growth since this proxy was made
        overload_interval_s: float = SAMPLE_INTERVAL_S,
        dns_resolve: Resolve = system_resolve,
    ) -> None:
        self.plane_name = plane
        self.upstream_mark = upstream_mark
        self.source_address = source_address
        self.original_destination = original_destination
        self.clock = clock
        self.stats = PlaneStats()
        self.log = AccessLogBuffer(access_log, format_json if log_format == "json" else format_text)
        self.tls_cache: dict = {}  # SSL contexts by (TLS context, secrets): survive snapshots (agent/proxy/tls.py)
        self.tls_stats = TlsStats()
        self.istio = IstioCounters()  # Istio's standard metrics with peer identities (agent/proxy/istio_stats.py)
        self.tls_client_cache: dict = {}  # upstream SSL contexts (agent/proxy/tls_context.py)
        self.table = RoutingTable(snapshot, plane, clock, self.tls_cache)
        # STRICT_DNS/LOGICAL_DNS clusters: resolved here, kept across snapshots (agent/proxy/dns.py)
        self.dns = DnsRefresh(clock)
        self.dns.sync(snapshot.clusters)
        self.table.balancer.dns = self.dns
        self.dns_resolver = DnsResolver(self.dns, dns_resolve, clock)
        self._dns_task: asyncio.Task | None = None
        self.sla = self.table.router.plane.sla
        self.bucket: TokenBucket | None = bucket_for(self.sla, clock)
        self.pool = UpstreamPool(
            self, max_idle_per_key=max_idle_per_key, idle_timeout_s=min(60.0, self.sla.idle_timeout_s)
        )
        self.h2_pool = LazyH2Pool(self)  # h2c (and h2 over TLS) upstream connections, multiplexed
        self.mirror_sender: MirrorSender | None = None  # made on the first mirrored request (mirrors())
        self.connections: set[ClientConnection] = set()  # every client connection, HTTP/1.1 or h2 (admitted or not)
        self.inflight: set[Timed] = set()  # attempts and h2 streams with a deadline, checked by _sweep_deadlines
        self._sweep_handle: asyncio.TimerHandle | None = None
        self.deadline_resolution_s = 0.02
        self.listen_ports: set[int] = set()
        self.draining = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by serve()
        self._servers: list[asyncio.base_events.Server] = []
        self.sniff_stats = SniffStats()
        self.sniff_timeout_s = sniff_timeout_s
        self._sniffers: list[tuple[SniffListener, asyncio.Task]] = []
        self._stopped: asyncio.Future[None] | None = None
        self._tick_s = tick_s
        self._tick_handle: asyncio.TimerHandle | None = None
        self.share = ConnectionShare(self.sla)  # per-source share, idle deadlines (every client connection)
        self.tls_pending = 0  # accepted connections before or in their TLS handshake (agent/proxy/tls.py)
        self.overload = OverloadManager(self.sla.memory_max_mb, self.sla.max_connections)
        self.memory_source = memory_source or RssGrowth()
        self._overload_s = overload_interval_s
        self._overload_handle: asyncio.TimerHandle | None = None

    @property
    def sniffing(self) -> bool:
        """A sniffing listener runs (its stats are worth reporting)."""
        return bool(self._sniffers)

    # ---- life cycle ------------------------------------------------------------------------------

    def _bind_loop(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self._stopped = self.loop.create_future()
            self._tick_handle = self.loop.call_later(self._tick_s, self._tick)
            self._dns_task = self.loop.create_task(self.dns_resolver.run(), name=f"dns-{self.plane_name}")
            self._sample_memory()

    async def start(self, sock: socket.socket) -> None:
        """Begin accepting on an already-bound listening socket and return (serve() also waits)."""
        self._bind_loop()
        port = sock.getsockname()[1]
        self.listen_ports.add(port)
        if self.upstream_mark:
            # Accepted connections inherit the listener's mark: replies to clients are routed like the plane's
            # upstreams (its routing table, if it has one: docs/planes.md), not by the main table's default.
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.upstream_mark)
        if port == self.table.router.plane.sniff_port:  # undeclared ports: peek first, then dispatch
            sniffer = SniffListener(self, sock, self.sniff_timeout_s)
            self._sniffers.append((sniffer, self.loop.create_task(sniffer.serve(), name=f"sniff-{port}")))
            return
        # asyncio re-listens with backlog 100 unless told: keep the kernel's somaxconn (sockets.listen_backlog)
        accept = accept_factory(self, self.http1_protocol)  # TLS ports first meet agent/proxy/tls.py
        server = await self.loop.create_server(accept, sock=sock, backlog=listen_backlog())
        self._servers.append(server)

    async def serve(self, sock: socket.socket) -> None:
        """Accept on `sock` until drain() (or cancellation)."""
        await self.start(sock)
        try:
            await self.wait_closed()
        finally:
            for server in self._servers:
                server.close()

    async def wait_closed(self) -> None:
        """Until drain() has finished."""
        self._bind_loop()
        assert self._stopped is not None
        await asyncio.shield(self._stopped)

    def upstream_binding(self, host: str) -> tuple[str | None, int]:
        """(source address, SO_MARK) of an upstream to `host`, both of the destination's plane: the connection
        leaves with that plane's address, and the mark's plane bits pick that plane's routing table and egress
        class (also when traffic of this plane may reach another: the plane's `forward_to`)."""
        source = self.source_address(host) if self.source_address is not None else None
        mark = self.upstream_mark
        if mark:
            try:
                plane = plane_of_address(self.table.snapshot.planes, host)
            except (AddrFormatError, ValueError, TypeError):  # a name, not an address: the arrival plane's mark
                plane = None
            if plane is not None:
                mark = (mark & ~PM_MARK_PLANE_MASK) | plane.plane_id
        return source, mark

    def update(self, snapshot: Snapshot) -> None:
        """Swap the configuration atomically; requests already routed keep what they resolved."""
        table = RoutingTable(snapshot, self.plane_name, self.clock, self.tls_cache, previous=self.table)
        sla = table.router.plane.sla
        if sla != self.sla:
            if (sla.rate_limit_rps, sla.rate_limit_burst) != (self.sla.rate_limit_rps, self.sla.rate_limit_burst):
                self.bucket = bucket_for(sla, self.clock)
            self.sla = sla
            self.share.configure(sla)
            self.overload.configure(sla.memory_max_mb, sla.max_connections)
        self.dns.sync(snapshot.clusters)
        table.balancer.dns = self.dns
        self.table = table
        self.dns_resolver.kick()
        self.pool.forget_keys()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish (at most `timeout` seconds), then close all."""
        if self.loop is None:
            return
        self.draining = True
        for server in self._servers:
            server.close()
        for sniffer, task in self._sniffers:
            sniffer.close()
            task.cancel()
        # Busy connections close after their current response (it says `Connection: close`; h2: a graceful
        # GOAWAY now, the streams in progress complete). An idle keep-alive connection is closed only once it
        # stayed idle a while: closing it at once races with a request the client may already have sent (Envoy's
        # drain does the same).
        for conn in list(self.connections):
            if conn.active is not None:
                conn.stop_keep_alive()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            quiet_since = self.loop.time() - DRAIN_IDLE_CLOSE_S
            for conn in [c for c in self.connections if c.active is None and c.last_active < quiet_since]:
                conn.close()
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close()
        self.pool.close_all()  # every upstream connection this proxy owns: HTTP/1.1, h2c, the mirrors' ones
        self.h2_pool.close_all()
        if self.mirror_sender is not None:
            self.mirror_sender.close()
        self.log.flush()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self._dns_task is not None:
            self._dns_task.cancel()
            self._dns_task = None
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if self._overload_handle is not None:
            self._overload_handle.cancel()
            self._overload_handle = None
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def http1_protocol(self) -> Downstream:
        """A new client connection speaking HTTP/1.x (an h2c preface found in it hands over to h2_protocol)."""
        return Downstream(self)

    def h2_protocol(self, preread: bytes = b"") -> H2Downstream:
        """A new client connection speaking h2c (prior knowledge); `preread`: its first bytes, read already."""
        return h2_downstream(self, preread)

    def mirrors(self) -> MirrorSender:
        """The mirror sender, made on first use (a proxy that never mirrors pays nothing)."""
        sender = self.mirror_sender
        if sender is None:
            sender = self.mirror_sender = MirrorSender(self.loop, self.upstream_binding)
        return sender

    def watch_deadline(self, ex: Timed) -> None:
        """Deadlines are checked by one sweep every `deadline_resolution_s` while requests are in flight:
        a call_later + cancel per request costs more than the whole routing step."""
        self.inflight.add(ex)
        if self._sweep_handle is None:
            self._sweep_handle = self.loop.call_later(self.deadline_resolution_s, self._sweep_deadlines)

    def _sweep_deadlines(self) -> None:
        self._sweep_handle = None
        now = self.loop.time()
        for ex in [ex for ex in self.inflight if ex.try_deadline <= now]:
            ex.on_timeout(now)
        if self.inflight:
            self._sweep_handle = self.loop.call_later(self.deadline_resolution_s, self._sweep_deadlines)

    def _tick(self) -> None:
        """Once per tick: write the access log batch, close idle pooled and client connections."""
        self.log.flush()
        self.pool.sweep()
        self.h2_pool.sweep(self.pool.idle_timeout_s)
        now = self.loop.time()
        keepalive_s = self.sla.idle_timeout_s
        headers_timeout = self.sla.request_headers_timeout_s
        share = self.share
        pressure = share.pressured(self.open_connections()) or self.overload.level >= Level.SOFT
        for conn in list(self.connections):
            if conn.active is None and not conn.in_headers:
                if share.idle_expired(conn, conn.last_active, now, keepalive_s, pressure):
                    if now - conn.last_active <= keepalive_s:
                        self.stats.idle_closed += 1  # closed before the plain idle timeout
                    conn.close()
            elif headers_timeout:
                conn.headers_overdue(now, headers_timeout)
            elif conn.active is None and now - conn.last_active > keepalive_s:
                conn.close()
        self._tick_handle = self.loop.call_later(self._tick_s, self._tick)

    # ---- admission: connection share and overload (agent/proxy/limits.py, overload.py) --------------------

    def admit(self, conn: ClientConnection) -> str | None:
        """A new client connection, any codec (in self.connections, counted in downstream_active): None if it may
        stay, else why not (REFUSED_*): HTTP/1.1 answers H1_REFUSALS[why], h2 a GOAWAY, then it is closed."""
        stats = self.stats
        if self.overload.shedding:
            stats.shed_connections += 1
            return REFUSED_MEMORY
        why = self.share.admit(conn, conn.peer_ip, conn.last_active, self.open_connections() + 1)
        if why is None:
            return None
        if why == "source":
            stats.source_refused += 1
            return REFUSED_SOURCE
        stats.overloaded += 1
        return REFUSED_CONNECTIONS

    def open_connections(self) -> int:
        """Connections holding the plane's budget: the admitted ones, whatever their codec. Refused connections
        still sending their 503 or GOAWAY (lingering) do not count: they cannot block anyone."""
        return len(self.share) + self.tls_pending  # TLS handshakes in progress hold a place too

    def release(self, conn: ClientConnection) -> None:
        self.share.release(conn)

    def overload_gate(self, ex: Exchange) -> bool:
        """Called for each request while the worker is not at Level.NORMAL or near its connection budget: no
        keep-alive; True if the request was answered 503 (memory) and must go no further. The h2 equivalent is
        h2_stream.Bridge.start (its connection is told to stop keep-alive with a GOAWAY, the stream is shed alike)."""
        ex.keep_alive = False
        why = self.overload.refuse()  # memory, or the node's overload (agent/node_pressure.py)
        if why is None:
            return False
        self.stats.shed_requests += 1
        ex.reply(503, MEMORY_SHED_BODY, SHED_HEADERS[why], OM)
        return True

    def _sample_memory(self) -> None:
        """Every SAMPLE_INTERVAL_S: read RSS, move the overload level, at HARD reset the biggest buffers."""
        self._overload_handle = self.loop.call_later(self._overload_s, self._sample_memory)  # first: never stops
        stats = self.stats
        rss = self.memory_source()
        level = self.overload.update(rss, stats.downstream_active)
        stats.memory_bytes = rss
        stats.overload_level = int(level)
        if level is Level.HARD:
            for victim in self.overload.victims(list(self.connections)):
                stats.overload_resets += 1
                victim.abort()
