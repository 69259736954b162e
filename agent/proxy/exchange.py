"""One proxied request/response: admission, filters, routing, the request body, the log record, the ending.

An Exchange is driven by callbacks from the downstream connection (request parsed, body bytes, request
complete, client gone) and from its upstream connection (response head, body, complete, lost). It never
awaits: no Task per request. Outgoing bytes are collected in lists and written once per event, so a small
request/response costs one send() each way. The upstream attempts (retries, timeouts) are in attempts.py,
the response relay in response.py, the upstream request head in request_head.py.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.attempts import HELD_REQUEST, UpstreamAttempts, rng
from planemesh.agent.proxy.authz import DENIED_BODY, rbac_denial
from planemesh.agent.proxy.balancer import normalise_ip, request_hash
from planemesh.agent.proxy.circuit import REQUESTS, RETRIES
from planemesh.agent.proxy.connect_target import connect_refusal
from planemesh.agent.proxy.filters import DELAY_INJECTED, FAULT_INJECTED, fault_decision
from planemesh.agent.proxy.http1 import (
    CONTINUE,
    CRLF,
    FRAME_NONE,
    LAST_CHUNK,
    UPGRADE_CONNECTION,
    chunk,
    last_chunk,
    local_reply,
)
from planemesh.agent.proxy.limits import rate_limited_headers
from planemesh.agent.proxy.mirror import sender_for, shadow_head
from planemesh.agent.proxy.request_checks import CONTINUE_SENT, EXPECT_NONE
from planemesh.agent.proxy.request_head import header_map, new_request_id, request_head
from planemesh.agent.proxy.response import ResponseRelay
from planemesh.agent.proxy.retry import NO_RETRY, backoff_s, sla_retry
from planemesh.agent.proxy.routing import redirect_location, split_target
from planemesh.agent.proxy.tunnel import TUNNEL_CONNECT, open_connect

if TYPE_CHECKING:
    import asyncio

    from planemesh.agent.config import Cluster, Endpoint, Route
    from planemesh.agent.proxy.balancer import Balancer
    from planemesh.agent.proxy.circuit import CircuitBreaker
    from planemesh.agent.proxy.downstream import Downstream
    from planemesh.agent.proxy.upstream import UpstreamConnection

__all__ = ["Exchange", "backoff_s", "new_request_id"]  # backoff_s, new_request_id: re-exported for callers

_perf = time.perf_counter
MAX_REPLAY_BODY = 64 * 1024  # a request body up to this size is kept so a retry can send it again


class Exchange(ResponseRelay, UpstreamAttempts):
    __slots__ = (
        "authority",
        "backoff",
        "balancer",
        "body_copy",
        "body_len",
        "body_streamed",
        "breaker",
        "bytes_rx",
        "bytes_tx",
        "cb_held",
        "cluster",
        "conn",
        "connect_task",
        "connect_timeout_s",
        "connect_to",
        "connection_values",
        "deadline",
        "ds",
        "ds_framing",
        "duration_ms",
        "endpoint",
        "expect_continue",
        "finished",
        "flags",
        "h2",
        "h2_fields",
        "has_xfp",
        "hash_key",
        "head",
        "headers",
        "is_head",
        "keep_alive",
        "method_b",
        "mirror_to",
        "pending",
        "plane",
        "req_chunked",
        "req_done",
        "req_length",
        "req_trailers",
        "request_id",
        "resp_started",
        "retries_held",
        "retry",
        "route",
        "start_time",
        "status",
        "t0",
        "t_tunnel",
        "t_upstream",
        "target",
        "tries_left",
        "try_deadline",
        "tunnel",
        "up_framing",
        "up_keep_alive",
        "up_out",
        "upgrade",
        "upstream_addr",
        "upstream_host",
        "upstream_key",
        "upstream_ms",
        "user_agent",
        "version",
        "xff",
    )

    def __init__(self, ds: Downstream) -> None:
        self.ds = ds
        self.plane = ds.proxy.plane_name
        self.start_time = time.time()
        self.t0 = _perf()
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method_b = b""
        self.version = "1.1"
        self.authority: str | None = None
        self.request_id: str | None = None
        self.xff: str | None = None
        self.user_agent: str | None = None
        self.connection_values: list[bytes] | None = None
        self.req_length = 0
        self.req_chunked = False
        self.req_done = False
        self.keep_alive = True
        self.is_head = False
        self.upgrade = b""  # the Upgrade header of a request that becomes a tunnel after a 101
        self.tunnel = 0  # TUNNEL_UPGRADE or TUNNEL_CONNECT: a tunnel once the upstream answers
        self.connect_to: tuple[str, int] | None = None  # a CONNECT request's target
        self.t_tunnel = -1.0  # ms from the request to the tunnel's start (-1: never a tunnel)
        self.req_trailers: list[tuple[bytes, bytes]] | None = None
        self.has_xfp = False
        self.expect_continue = EXPECT_NONE  # request_checks: EXPECT_CONTINUE until the 100 is sent
        self.status = 0
        self.flags = ""
        self.bytes_rx = 0
        self.bytes_tx = 0
        self.duration_ms = 0
        self.upstream_ms: int | None = None
        self.upstream_host: str | None = None
        self.upstream_addr: tuple[str, int] | None = None
        self.upstream_key: tuple | None = None
        self.t_upstream = 0.0
        self.cluster: Cluster | None = None
        self.conn: UpstreamConnection | None = None
        self.h2 = False  # the request goes upstream as an h2 stream (h1_over_h2.py): the cluster says http2
        self.h2_fields: list[tuple[bytes, bytes]] | None = None
        self.connect_task = None
        self.up_out: list[bytes] = []
        self.head = b""
        self.body_streamed = False
        self.resp_started = False
        self.ds_framing = FRAME_NONE
        self.up_framing = FRAME_NONE
        self.up_keep_alive = False
        self.deadline = 0.0  # loop time; 0: no deadline
        self.try_deadline = 0.0
        self.finished = False
        self.pending = False
        self.tries_left = 0
        self.retry = NO_RETRY
        self.route: Route | None = None
        self.balancer: Balancer | None = None
        self.breaker: CircuitBreaker | None = None
        self.cb_held = 0
        self.retries_held = 0
        self.endpoint: Endpoint | None = None
        self.hash_key: int | None = None
        self.backoff: asyncio.TimerHandle | None = None
        self.body_copy: list[bytes] | None = []
        self.body_len = 0
        self.connect_timeout_s = 5.0
        self.mirror_to: list[tuple[str, int]] = []

    # ---- access-log view (formatted lazily at flush time) -------------------------------------------

    @property
    def method(self) -> str:
        return self.method_b.decode("latin-1")

    @property
    def path(self) -> str:
        return self.target.decode("latin-1")

    @property
    def protocol(self) -> str:
        return f"HTTP/{self.version}"

    # ---- request side -----------------------------------------------------------------------------

    def start(self) -> None:
        """The request head is complete and it is this connection's turn: admit, filter, route, go upstream."""
        proxy = self.ds.proxy
        stats = proxy.stats
        stats.requests_total += 1
        stats.requests_active += 1
        sla = proxy.sla
        if stats.requests_active > sla.max_requests:
            return self.overloaded(b"requests")
        if not proxy.overload.keep_alive and proxy.overload_gate(self):  # memory/connection pressure
            return None
        if proxy.bucket is not None and not proxy.bucket.take():
            stats.rate_limited += 1
            return self.reply(429, b"local rate limited\n", rate_limited_headers(proxy.bucket), flags.RL)
        table = proxy.table
        ds = self.ds
        if ds.table is not table:  # first request of the connection, or a new snapshot since
            ds.table = table
            ds.route_config = table.router.route_config(ds.local[0], ds.local[1])
        crc = ds.route_config
        if crc is not None and crc.http_filters:
            chain = crc.filter_chain(proxy.clock)
            if chain.rbac and rbac_denial(proxy, chain.rbac, lambda: header_map(self.headers), self.method,
                                          self.target.decode("latin-1"), self.authority or "", ds.local, ds.peer_ip,
                                          ds.transport):  # fmt: skip
                return self.reply(403, DENIED_BODY)
            for limiter in chain.limiters:
                if not limiter.take():
                    stats.rate_limited += 1
                    return self.reply(429, b"local_rate_limited", limiter.headers(), flags.RL)
            for fault in chain.faults:
                decision = fault_decision(fault, header_map(self.headers), rng.random)
                if decision.delay_s:
                    self.flags = DELAY_INJECTED
                    self.backoff = proxy.loop.call_later(decision.delay_s, self._after_delay, decision.abort_status)
                    return None
                if decision.abort_status is not None:
                    return self.reply(decision.abort_status, b"fault filter abort", (), FAULT_INJECTED)
        return self._route()

    def _after_delay(self, abort_status: int | None) -> None:
        self.backoff = None
        if self.finished:
            return
        if abort_status is not None:
            self.reply(abort_status, b"fault filter abort", (), DELAY_INJECTED + "," + FAULT_INJECTED)
        else:
            self._route()
            self.flush_upstream()
        self.ds.flush()

    def _route(self) -> None:
        proxy = self.ds.proxy
        table = proxy.table
        router = table.router
        ds = self.ds
        if ds.table is not table:  # a new snapshot arrived during a fault delay
            ds.table = table
            ds.route_config = router.route_config(ds.local[0], ds.local[1])
        crc = ds.route_config
        if crc is None:
            crc = router.original_destination
        connect = self.tunnel == TUNNEL_CONNECT
        result = router.route_request(crc, self.authority or "", self.target, self._header_map, connect)
        if not result.forward:
            if result.direct is not None:
                return self.reply(result.direct.status, result.direct.body)
            if result.redirect is not None:
                path, query = split_target(self.target.decode("latin-1"))
                loc = redirect_location(result.redirect, "http", self.authority or "", path, query)
                return self.reply(result.redirect.code, b"", [(b"location", loc.encode("latin-1"))])
            if connect and not crc.upgrade_allowed(None, "connect"):
                return self.refuse(b"CONNECT is not enabled on this listener\n")
            return self.reply(404, b"", (), flags.NR)
        route = self.route = result.route
        if route is not None and route.rate_limit is not None:  # the route's own bucket, after the listener's
            limiter = table.route_limiter(route)
            if not limiter.take():
                proxy.stats.rate_limited += 1
                return self.reply(429, b"local_rate_limited", limiter.headers(), flags.RL)
        if route is not None and route.fault is not None and DELAY_INJECTED not in self.flags:
            # The route's fault (Istio VirtualService), after routing; a delay comes back here once, flagged.
            decision = fault_decision(route.fault, header_map(self.headers), rng.random)
            if decision.delay_s:
                self.flags = DELAY_INJECTED
                self.backoff = proxy.loop.call_later(decision.delay_s, self._after_delay, decision.abort_status)
                return None
            if decision.abort_status is not None:
                return self.reply(decision.abort_status, b"fault filter abort", (), FAULT_INJECTED)
        if self.tunnel and not crc.upgrade_allowed(route, self.upgrade_type):
            kind = b"CONNECT" if connect else b"upgrade to " + self.upgrade.strip()
            return self.refuse(kind + b" is not allowed on this route\n")
        action = route.action  # type: ignore[union-attr]
        cluster = result.cluster
        balancer = self.balancer = table.balancer
        if result.weighted:
            cluster = balancer.cluster_for(action)  # type: ignore[arg-type]
        sla = proxy.sla
        policy = action.retry if action is not None and action.retry is not None else sla_retry(sla)
        self.retry = policy
        self.tries_left = policy.num_retries
        if cluster is None:
            if result.cluster_missing or result.weighted:  # Envoy: 503, empty body, flag NC
                return self.reply(503, b"", (), flags.NC)
            if connect:  # the original destination, never the client's authority (connect_target.py)
                target = (normalise_ip(ds.local[0]), ds.local[1])
            elif ds.loops_to_self:
                return self.reply(404, b"", (), flags.NR)  # not intercepted: would forward to ourselves
            else:
                target = (normalise_ip(ds.local[0]), ds.local[1])
        else:
            self.cluster = cluster
            self.h2 = cluster.http2 and not self.tunnel
            self.breaker = breaker = balancer.breaker(cluster)
            if not breaker.try_acquire(REQUESTS):
                return self.overloaded(b"cluster_requests")
            self.cb_held |= HELD_REQUEST
            if action is not None and action.hash_policy:
                self.hash_key = request_hash(action.hash_policy, self._header_map, ds.peer_ip)
            picked = self._pick()  # ORIGINAL_DST: the original destination, for a CONNECT too
            if picked is None:
                return self.reply(503, b"no healthy upstream\n", (), flags.UF)
            target = picked
        self.upstream_addr = target
        if connect:
            return self._open_connect(target, result.connect_timeout_s)
        extra = UPGRADE_CONNECTION + b"upgrade: " + self.upgrade + CRLF if self.tunnel else b""
        self.head = request_head(self, route, extra)
        if not self.h2:  # an h2 stream's head is its HEADERS frame (h1_over_h2.py); up_out holds only the body
            self.up_out.insert(0, self.head)
        if action is not None and action.mirrors and cluster is not None and not self.tunnel:
            self._mirror(action.mirrors)
        timeout = result.timeout_s
        per_try = policy.per_try_timeout_s
        if timeout or per_try:
            now = proxy.loop.time()
            self.deadline = now + timeout if timeout else float("inf")
            self.try_deadline = min(self.deadline, now + per_try) if per_try else self.deadline
            proxy.watch_deadline(self)
        self.t_upstream = _perf()
        self.connect_timeout_s = result.connect_timeout_s
        if self.expect_continue and not self.req_done:  # routed and going upstream: the client may send its body
            self.expect_continue = CONTINUE_SENT
            ds.out.append(CONTINUE)
        self._attempt(target, reuse=True)

    # ---- tunnels (tunnel.py) ----------------------------------------------------------------------------

    @property
    def upgrade_type(self) -> str:
        """What the route's upgrade_configs are matched against: "connect" or the Upgrade value, lower-case."""
        return "connect" if self.tunnel == TUNNEL_CONNECT else self.upgrade.strip().lower().decode("latin-1")

    def refuse(self, body: bytes) -> None:
        """An upgrade or CONNECT the configuration does not allow: 403 (Envoy's upgrade_failed). After a refused
        upgrade the connection stays HTTP; after a refused CONNECT it closes (tunnel bytes may follow)."""
        if self.tunnel == TUNNEL_CONNECT:
            self.keep_alive = False
        self.reply(403, body)

    def _open_connect(self, target: tuple[str, int], connect_timeout_s: float) -> None:
        refused = connect_refusal(target, self.cluster, self.connect_to, self.ds.proxy.listen_ports)
        if refused is not None:
            return self.refuse(refused)
        if self.request_id is None:
            self.request_id = new_request_id().decode()
        self.t_upstream = _perf()
        self.connect_timeout_s = connect_timeout_s
        open_connect(self, target[0], target[1])
        return None

    def _mirror(self, mirrors) -> None:
        """Shadow copies of a body-less (or fully buffered) request; the primary never waits for them."""
        if self.req_length > MAX_REPLAY_BODY:
            return  # a large body is not mirrored (it would have to be held); chunked ones are checked at the end
        for mirror in mirrors:
            if mirror.fraction < 1.0 and rng.random() >= mirror.fraction:
                continue
            cluster = self.ds.proxy.table.snapshot.clusters.get(mirror.cluster)
            if cluster is None:
                continue
            ep = self.balancer.pick_endpoint(cluster)  # type: ignore[union-attr]
            if ep is None:
                continue
            self.mirror_to.append((ep.address, ep.port))
        if self.mirror_to and self.req_done:
            self._send_mirrors()

    def _send_mirrors(self) -> None:
        body = b"".join(self.body_copy) if self.body_copy else b""
        if self.req_chunked and self.body_copy is not None:
            body = (chunk(body) if body else b"") + self.request_end()
        elif self.body_copy is None:
            self.mirror_to.clear()
            return
        request = shadow_head(self.head) + body
        sender = sender_for(self.ds.proxy)
        for addr in self.mirror_to:
            sender.send(addr, request)
        self.mirror_to.clear()

    def _header_map(self) -> dict[str, str]:
        return header_map(self.headers)

    def on_request_body(self, data: bytes) -> None:
        self.bytes_rx += len(data)
        if self.finished:
            return
        self.body_streamed = True
        if self.body_copy is not None:
            self.body_len += len(data)
            if self.body_len > MAX_REPLAY_BODY:
                self.body_copy = None  # too big to replay: no retry once any of it went out
            else:
                self.body_copy.append(data)
        self.up_out.append(chunk(data) if self.req_chunked and not self.h2 else data)

    def on_request_trailer(self, name: bytes, value: bytes) -> None:
        if self.req_trailers is None:
            self.req_trailers = [(name, value)]
        else:
            self.req_trailers.append((name, value))

    def request_end(self) -> bytes:
        """The last chunk of a chunked request body, with the client's trailers."""
        return LAST_CHUNK if self.req_trailers is None else last_chunk(self.req_trailers)

    def h2_request_end(self) -> list[tuple[bytes, bytes]]:
        """The end of a chunked request body on an h2 stream: its trailers (empty: an END_STREAM alone)."""
        return self.req_trailers or []

    def on_request_complete(self) -> None:
        self.req_done = True
        if self.req_chunked and not self.finished:
            self.up_out.append(self.h2_request_end() if self.h2 else self.request_end())  # type: ignore[arg-type]
        if self.mirror_to and not self.finished:
            self._send_mirrors()

    def flush_upstream(self) -> None:
        conn = self.conn
        if conn is not None and self.up_out and conn.ready:
            if self.h2:
                items, self.up_out = self.up_out, []
                conn.write(items)  # type: ignore[attr-defined]
                return
            data = b"".join(self.up_out) if len(self.up_out) > 1 else self.up_out[0]
            self.up_out.clear()
            conn.transport.write(data)

    def on_downstream_lost(self) -> None:
        if self.finished:
            return
        self.flags = flags.DC if not self.flags else self.flags + "," + flags.DC
        self.keep_alive = False
        self.finish(abort=True)

    # ---- endings ----------------------------------------------------------------------------------

    def overloaded(self, which: bytes) -> None:
        self.ds.proxy.stats.overloaded += 1
        self.reply(503, b"overloaded\n", [(b"x-planemesh-overloaded", which)], flags.UO)

    def reply(self, status: int, body: bytes, headers=(), flag: str = "") -> None:
        """Answer locally (errors, redirects, direct responses) unless a response has already started."""
        if self.finished:
            return
        if self.resp_started:
            self.flags = flag
            self.keep_alive = False
            self.finish(abort=True)
            return
        self.status = status
        self.flags = flag
        if (not self.req_done and not self.tunnel) or self.ds.proxy.draining:  # tunnel requests have no body
            self.keep_alive = False
        self.bytes_tx = 0 if self.is_head else len(body)
        http10 = self.version == "1.0"
        self.ds.out.append(
            local_reply(status, body, headers, close=not self.keep_alive, head_only=self.is_head, http10=http10)
        )
        self.resp_started = True
        self._drop_upstream()
        self.finish()

    def finish(self, abort: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        proxy = self.ds.proxy
        if self.deadline:
            proxy.inflight.discard(self)
        if self.connect_task is not None:
            self.connect_task = None  # the pool hands a late connection back to the idle list
        if self.pending:
            self.pending = False
            proxy.stats.requests_pending -= 1
        if abort:
            self._drop_upstream()
        if self.backoff is not None:
            self.backoff.cancel()
            self.backoff = None
        self._end_attempt(-1)
        breaker = self.breaker
        if breaker is not None:
            if self.cb_held & HELD_REQUEST:
                breaker.release(REQUESTS)
            for _ in range(self.retries_held):
                breaker.release(RETRIES)
            self.cb_held = self.retries_held = 0
        proxy.stats.requests_active -= 1
        self.up_out.clear()
        self.headers = []
        duration = (_perf() - self.t0) * 1000
        self.duration_ms = int(duration)
        latency = duration if self.t_tunnel < 0 else self.t_tunnel  # a tunnel's latency: until it was open
        proxy.stats.record_response(self.status, latency, self.bytes_rx, self.bytes_tx, self.flags)
        proxy.log.append(self)
        self.ds.exchange_done(self, abort)
