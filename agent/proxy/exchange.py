"""One proxied request/response: routing, admission, the upstream attempt, response re-framing, the log record.

An Exchange is driven by callbacks from the downstream connection (request parsed, body bytes, request
complete, client gone) and from its upstream connection (response head, body, complete, lost). It never
awaits: no Task per request. Outgoing bytes are collected in lists and written once per event, so a small
request/response costs one send() each way.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import time
from typing import TYPE_CHECKING

from planemesh.agent.config import ClusterKind, RetryPolicy
from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.balancer import normalise_ip, request_hash
from planemesh.agent.proxy.circuit import CONNECTIONS, PENDING, REQUESTS, RETRIES
from planemesh.agent.proxy.filters import DELAY_INJECTED, FAULT_INJECTED, fault_decision
from planemesh.agent.proxy.http1 import (
    CHUNKED,
    CONNECTION_CLOSE,
    CRLF,
    HOP_BY_HOP,
    LAST_CHUNK,
    append_headers,
    chunk,
    dropped_names,
    local_reply,
    no_body_status,
    status_line,
)
from planemesh.agent.proxy.limits import rate_limited_headers
from planemesh.agent.proxy.mirror import sender_for, shadow_head
from planemesh.agent.proxy.outlier import GATEWAY_FAILURE
from planemesh.agent.proxy.routing import redirect_location, split_target
from planemesh.agent.proxy.tracing import TRACE_HEADERS, outgoing_trace_headers

if TYPE_CHECKING:
    from planemesh.agent.config import Cluster, Endpoint, Route
    from planemesh.agent.proxy.balancer import Balancer
    from planemesh.agent.proxy.circuit import CircuitBreaker
    from planemesh.agent.proxy.downstream import Downstream
    from planemesh.agent.proxy.upstream import UpstreamConnection
    from planemesh.netplanes.model import SLA

_perf = time.perf_counter
_getrandbits = random.getrandbits
RETRY_ON_TIMEOUT = frozenset({"5xx", "gateway-error", "reset"})
GATEWAY_ERRORS = frozenset({502, 503, 504})
MAX_REPLAY_BODY = 64 * 1024  # a request body up to this size is kept so a retry can send it again
_rng = random.Random()
_HELD_REQUEST, _HELD_PENDING, _HELD_CONNECTION = 1, 2, 4  # circuit breaker units an exchange holds
_NO_RETRY = RetryPolicy(num_retries=0)


@functools.lru_cache(maxsize=64)
def sla_retry(sla: SLA) -> RetryPolicy:
    """The plane SLA's retries as a route retry policy (used when the route has none)."""
    return RetryPolicy(retry_on=frozenset(sla.retry_on), num_retries=sla.retries,
                       per_try_timeout_s=sla.per_try_timeout_s)


def response_headers(route: Route, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A route's response header manipulation: remove, then add (append) or set (append=False)."""
    if route.response_headers_to_remove:
        gone = {n.lower().encode() for n in route.response_headers_to_remove}
        headers = [(n, v) for n, v in headers if n.lower() not in gone]
    for hv in route.response_headers_to_add:
        name = hv.name.lower().encode()
        if not hv.append:
            headers = [(n, v) for n, v in headers if n.lower() != name]
        headers = [*headers, (name, hv.value.encode("latin-1"))]
    return headers


def backoff_s(policy: RetryPolicy, retry_number: int, roll: float) -> float:
    """Envoy's fully jittered exponential back-off: uniform in [0, min(max, base * 2^(n-1)))."""
    ceiling = min(policy.backoff_max_s, policy.backoff_base_s * (2 ** max(0, retry_number - 1)))
    return max(0.0, ceiling * roll)
# Request ids: uuid4 text, a random per-process part plus a counter. Ids need uniqueness, not secrecy;
# uuid.uuid4() costs a getrandom() syscall per request.
_RID_PREFIX = f"{_getrandbits(32):08x}-{_getrandbits(16):04x}-4{_getrandbits(12):03x}-{0x8000 | _getrandbits(14):04x}-"
_rid_counter = itertools.count(_getrandbits(40))
KEEP_ALIVE_HEADER = b"connection: keep-alive\r\n"
FORWARDED_PROTO = b"x-forwarded-proto: http\r\n"

# Upstream framing of a response body.
FRAME_NONE, FRAME_LENGTH, FRAME_CHUNKED, FRAME_CLOSE = 0, 1, 2, 3


def new_request_id() -> bytes:
    return f"{_RID_PREFIX}{next(_rid_counter) & 0xFFFFFFFFFFFF:012x}".encode()


class Exchange:
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
        "connection_values",
        "deadline",
        "ds",
        "ds_framing",
        "duration_ms",
        "endpoint",
        "finished",
        "flags",
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
        "request_id",
        "resp_started",
        "retries_held",
        "retry",
        "route",
        "start_time",
        "status",
        "t0",
        "t_upstream",
        "target",
        "tries_left",
        "try_deadline",
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
        self.upgrade = False
        self.has_xfp = False
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
        self.retry = _NO_RETRY
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
            for limiter in chain.limiters:
                if not limiter.take():
                    stats.rate_limited += 1
                    return self.reply(429, b"local_rate_limited", limiter.headers(), flags.RL)
            for fault in chain.faults:
                decision = fault_decision(fault, self._header_map(), _rng.random)
                if decision.delay_s:
                    self.flags = DELAY_INJECTED
                    self.backoff = proxy.loop.call_later(decision.delay_s, self._after_delay,
                                                         decision.abort_status)
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
        result = router.route_request(crc, self.authority or "", self.target, self._header_map)
        if not result.forward:
            if result.direct is not None:
                return self.reply(result.direct.status, result.direct.body)
            if result.redirect is not None:
                path, query = split_target(self.target.decode("latin-1"))
                loc = redirect_location(result.redirect, "http", self.authority or "", path, query)
                return self.reply(result.redirect.code, b"", [(b"location", loc.encode("latin-1"))])
            return self.reply(404, b"", (), flags.NR)
        route = self.route = result.route
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
            if result.cluster_missing:
                return self.reply(503, b"no healthy upstream\n", (), flags.UF)
            if ds.loops_to_self:
                return self.reply(404, b"", (), flags.NR)  # not intercepted: would forward to ourselves
            target = (normalise_ip(ds.local[0]), ds.local[1])
        else:
            self.cluster = cluster
            self.breaker = breaker = balancer.breaker(cluster)
            if not breaker.try_acquire(REQUESTS):
                return self.overloaded(b"cluster_requests")
            self.cb_held |= _HELD_REQUEST
            if action is not None and action.hash_policy:
                self.hash_key = request_hash(action.hash_policy, self._header_map, ds.peer_ip)
            picked = self._pick()
            if picked is None:
                return self.reply(503, b"no healthy upstream\n", (), flags.UF)
            target = picked
        self.upstream_addr = target
        self.head = self._request_head(route)
        self.up_out.insert(0, self.head)
        if action is not None and action.mirrors and cluster is not None:
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
        self._attempt(target, reuse=True)

    def _pick(self) -> tuple[str, int] | None:
        """The next endpoint of the request's cluster; the attempt on it is open until _end_attempt()."""
        cluster = self.cluster
        assert cluster is not None and self.balancer is not None
        if cluster.kind is ClusterKind.ORIGINAL_DST:
            return normalise_ip(self.ds.local[0]), self.ds.local[1]
        ep = self.balancer.pick_endpoint(cluster, self.hash_key)
        if ep is None:
            return None
        self.balancer.lb(cluster).started(ep)
        self.endpoint = ep
        return ep.address, ep.port

    def _end_attempt(self, status: int) -> None:
        """The current attempt's outcome (HTTP status, 0 gateway failure, -1 none) for outlier detection."""
        breaker = self.breaker
        if breaker is not None:
            if self.cb_held & _HELD_PENDING:
                breaker.release(PENDING)
            if self.cb_held & _HELD_CONNECTION:
                breaker.release(CONNECTIONS)
            self.cb_held &= ~(_HELD_PENDING | _HELD_CONNECTION)
        ep = self.endpoint
        if ep is not None:
            self.endpoint = None
            self.balancer.report(self.cluster, ep, status)  # type: ignore[union-attr, arg-type]

    def _attempt(self, target: tuple[str, int], reuse: bool) -> None:
        """Open an attempt on `target` within the cluster's connection and pending limits."""
        breaker = self.breaker
        if breaker is not None:
            if not breaker.try_acquire(CONNECTIONS):
                self._end_attempt(-1)
                return self.overloaded(b"cluster_connections")
            self.cb_held |= _HELD_CONNECTION
            if not breaker.try_acquire(PENDING):
                self._end_attempt(-1)
                return self.overloaded(b"cluster_pending")
            self.cb_held |= _HELD_PENDING
        pool = self.ds.proxy.pool
        if reuse:
            pool.acquire_for(self, target, self.connect_timeout_s)
        else:
            pool.connect_for(self, target, self.connect_timeout_s)

    def _mirror(self, mirrors) -> None:
        """Shadow copies of a body-less (or fully buffered) request; the primary never waits for them."""
        if self.req_length > MAX_REPLAY_BODY:
            return  # a large body is not mirrored (it would have to be held); chunked ones are checked at the end
        for mirror in mirrors:
            if mirror.fraction < 1.0 and _rng.random() >= mirror.fraction:
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
            body = (chunk(body) if body else b"") + LAST_CHUNK
        elif self.body_copy is None:
            self.mirror_to.clear()
            return
        request = shadow_head(self.head) + body
        sender = sender_for(self.ds.proxy)
        for addr in self.mirror_to:
            sender.send(addr, request)
        self.mirror_to.clear()

    def _header_map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self.headers:
            key = name.decode("latin-1")
            v = value.decode("latin-1")
            out[key] = f"{out[key]},{v}" if key in out else v
        return out

    def _request_head(self, route) -> bytes:
        drop = HOP_BY_HOP if self.connection_values is None else dropped_names(self.connection_values)
        target = self.target
        headers = self.headers
        if route is not None:
            action = route.action
            if action is not None and action.prefix_rewrite is not None:
                prefix = route.match.prefix
                if prefix and target.startswith(prefix.encode()):
                    target = action.prefix_rewrite.encode() + target[len(prefix):]
            if action is not None and action.host_rewrite is not None:
                headers = [(n, v) for n, v in headers if n != b"host"]
                headers.insert(0, (b"host", action.host_rewrite.encode()))
            if route.request_headers_to_remove:
                gone = {n.lower().encode() for n in route.request_headers_to_remove}
                headers = [(n, v) for n, v in headers if n not in gone]
            for hv in route.request_headers_to_add:
                name = hv.name.lower().encode()
                if not hv.append:
                    headers = [(n, v) for n, v in headers if n != name]
                headers.append((name, hv.value.encode()))
        incoming_trace = {n.decode("latin-1"): v.decode("latin-1") for n, v in headers if n in TRACE_HEADERS}
        if incoming_trace:
            headers = [(n, v) for n, v in headers if n not in TRACE_HEADERS]
        parts = [self.method_b, b" ", target, b" HTTP/1.1\r\n"]
        append_headers(parts, headers, drop)
        for name, value in outgoing_trace_headers(incoming_trace):
            parts += (name, b": ", value, CRLF)
        if self.request_id is None:
            rid = new_request_id()
            self.request_id = rid.decode()
            parts += (b"x-request-id: ", rid, CRLF)
        peer = self.ds.peer_ip
        self.xff = f"{self.xff}, {peer}" if self.xff else peer
        parts += (b"x-forwarded-for: ", self.xff.encode("latin-1"), CRLF)
        if not self.has_xfp:
            parts.append(FORWARDED_PROTO)
        if self.req_chunked:
            parts.append(CHUNKED)
        elif self.req_length:
            parts.append(b"content-length: %d\r\n" % self.req_length)
        parts.append(CRLF)
        return b"".join(parts)

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
        self.up_out.append(chunk(data) if self.req_chunked else data)

    def on_request_complete(self) -> None:
        self.req_done = True
        if self.req_chunked and not self.finished:
            self.up_out.append(LAST_CHUNK)
        if self.mirror_to and not self.finished:
            self._send_mirrors()

    def flush_upstream(self) -> None:
        conn = self.conn
        if conn is not None and self.up_out and conn.ready:
            data = b"".join(self.up_out) if len(self.up_out) > 1 else self.up_out[0]
            self.up_out.clear()
            conn.transport.write(data)

    # ---- upstream side ----------------------------------------------------------------------------

    def on_connected(self, conn: UpstreamConnection) -> None:
        if self.cb_held & _HELD_PENDING:
            self.cb_held &= ~_HELD_PENDING
            self.breaker.release(PENDING)  # type: ignore[union-attr]
        self.conn = conn
        conn.exchange = self
        self.flush_upstream()
        self.ds.resume_for_buffer()

    def on_connect_failed(self, timed_out: bool) -> None:
        stats = self.ds.proxy.stats
        stats.upstream_connect_failures += 1
        self._end_attempt(GATEWAY_FAILURE)
        if self._may_retry("connect-failure"):
            self._retry(reuse=True)
            return
        self.reply(503, b"upstream connect error\n", (), self._exhausted(flags.UF))
        self.ds.flush()

    # ---- retries ------------------------------------------------------------------------------------

    def _replayable(self) -> bool:
        """Nothing of the body went out yet, or all of it is buffered (within MAX_REPLAY_BODY)."""
        return not self.body_streamed or self.body_copy is not None

    def _may_retry(self, condition: str, status: int = 0) -> bool:
        """Whether the retry policy covers this failure and a retry is still allowed."""
        retry_on = self.retry.retry_on
        if condition == "status":
            covered = ("5xx" in retry_on and status >= 500) or (
                "gateway-error" in retry_on and status in GATEWAY_ERRORS) or (
                "retriable-status-codes" in retry_on and status in self.retry.retriable_status_codes)
        elif condition == "timeout":
            covered = bool(retry_on & RETRY_ON_TIMEOUT)
        elif condition == "connect-failure":
            covered = "connect-failure" in retry_on or "gateway-error" in retry_on or "5xx" in retry_on
        else:  # reset: Envoy's 5xx covers resets too
            covered = condition in retry_on or "5xx" in retry_on
        if not covered or self.tries_left <= 0 or not self._replayable():
            return False
        if self.breaker is not None and not self.breaker.try_acquire(RETRIES):
            self.tries_left = 0  # retry budget of the cluster spent: the failure goes to the client (URX)
            return False
        if self.breaker is not None:
            self.retries_held += 1
        return True

    def _exhausted(self, flag: str) -> str:
        """`flag`, plus URX when retries were configured and all were used."""
        if self.retry.num_retries > 0 and self.tries_left <= 0:
            return f"{flag},{flags.URX}" if flag else flags.URX
        return flag

    def _retry(self, reuse: bool = False) -> None:
        """Start the next attempt after a jittered back-off (the failed attempt has been ended)."""
        proxy = self.ds.proxy
        self.tries_left -= 1
        proxy.stats.retries += 1
        self._drop_upstream()
        self._rearm_request()
        delay = backoff_s(self.retry, self.retry.num_retries - self.tries_left, _rng.random())
        if self.deadline:
            self.try_deadline = self.deadline  # no per-try clock runs during the back-off
        if delay < 0.001:
            self._next_attempt(reuse)
        else:
            self.backoff = proxy.loop.call_later(delay, self._next_attempt, reuse)

    def _next_attempt(self, reuse: bool) -> None:
        self.backoff = None
        if self.finished:
            return
        per_try = self.retry.per_try_timeout_s
        if self.deadline and per_try:
            self.try_deadline = min(self.deadline, self.ds.proxy.loop.time() + per_try)
        target = self._next_target()
        if target is None:
            self.reply(503, b"no healthy upstream\n", (), flags.UF)
            self.ds.flush()
            return
        self._attempt(target, reuse)
        if self.finished:
            self.ds.flush()

    def on_response_head(self, status: int, phrase: bytes, headers: list[tuple[bytes, bytes]],
                         up_length: int | None, up_chunked: bool, up_keep_alive: bool,
                         connection_values: list[bytes] | None) -> None:
        if self.finished:
            return
        if status < 200 and status != 101:  # interim (100 Continue, 103): relay to 1.1 clients only
            if self.version == "1.1":
                parts = [status_line(status, phrase)]
                append_headers(parts, headers, HOP_BY_HOP)
                parts.append(CRLF)
                self.ds.out.append(b"".join(parts))
            return
        self._end_attempt(status)
        retriable = status >= 500 or status in self.retry.retriable_status_codes
        if retriable and self.req_done and self._may_retry("status", status):
            self._retry()  # this response is dropped with its connection
            return
        if retriable and self.retry.num_retries > 0 and self.tries_left <= 0:
            self.flags = flags.URX
        self.upstream_ms = int((_perf() - self.t_upstream) * 1000)
        self.status = status
        self.resp_started = True
        self.up_keep_alive = up_keep_alive
        drop = HOP_BY_HOP if connection_values is None else dropped_names(connection_values)
        route = self.route
        if route is not None and (route.response_headers_to_add or route.response_headers_to_remove):
            headers = response_headers(route, headers)
        parts = [status_line(status, phrase)]
        append_headers(parts, headers, drop)
        if self.is_head or no_body_status(status):
            self.up_framing = FRAME_NONE
            self.ds_framing = FRAME_NONE
            if up_length is not None and status != 204 and status >= 200:
                parts.append(b"content-length: %d\r\n" % up_length)
        elif up_length is not None:
            self.up_framing = self.ds_framing = FRAME_LENGTH
            parts.append(b"content-length: %d\r\n" % up_length)
        else:
            self.up_framing = FRAME_CHUNKED if up_chunked else FRAME_CLOSE
            if not up_chunked:
                self.up_keep_alive = False
            if self.version == "1.1":
                self.ds_framing = FRAME_CHUNKED
                parts.append(CHUNKED)
            else:
                self.ds_framing = FRAME_CLOSE
                self.keep_alive = False
        if self.ds.proxy.draining or not self.req_done:
            self.keep_alive = False  # an early response while the client still sends: close afterwards
        if not self.keep_alive:
            parts.append(CONNECTION_CLOSE)
        elif self.version == "1.0":
            parts.append(KEEP_ALIVE_HEADER)
        parts.append(CRLF)
        self.ds.out.append(b"".join(parts))

    def on_response_body(self, data: bytes) -> None:
        if self.finished:
            return
        self.bytes_tx += len(data)
        self.ds.out.append(chunk(data) if self.ds_framing == FRAME_CHUNKED else data)

    def on_response_complete(self) -> None:
        if self.finished:
            return
        if self.ds_framing == FRAME_CHUNKED:
            self.ds.out.append(LAST_CHUNK)
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.exchange = None
            if self.up_keep_alive and self.req_done and self.up_framing != FRAME_CLOSE:
                self.ds.proxy.pool.release(conn)
            else:
                conn.close()
        self.finish()

    def on_upstream_lost(self, conn: UpstreamConnection) -> None:
        """The upstream connection closed (or broke) before the response completed."""
        if self.finished:
            return
        self.conn = None
        if self.resp_started:
            if self.up_framing == FRAME_CLOSE:  # close-delimited body: this is its end
                if self.ds_framing == FRAME_CHUNKED:
                    self.ds.out.append(LAST_CHUNK)
                self.finish()
            else:
                self.flags = flags.UC
                self.keep_alive = False
                self.finish(abort=True)
            self.ds.flush()
            return
        # A pooled connection the server had already closed: safe to try once more on a fresh one
        # when the request can be replayed; the retry policy's "reset" follows the same rule.
        if conn.reused and self._replayable():
            self._end_attempt(-1)
            self._rearm_request()
            self.ds.proxy.pool.connect_for(self, self._next_target() or self.upstream_addr,  # type: ignore[arg-type]
                                           self.connect_timeout_s)
            return
        self._end_attempt(GATEWAY_FAILURE)
        if self._may_retry("reset"):
            self._retry()
            return
        self.reply(503, b"upstream connect error or disconnect/reset before headers\n", (), self._exhausted(flags.UC))
        self.ds.flush()

    def on_upstream_protocol_error(self) -> None:
        if self.finished:
            return
        if self.resp_started:
            self.flags = flags.UPE
            self.keep_alive = False
            self.finish(abort=True)
        else:
            self.reply(502, b"upstream protocol error\n", (), flags.UPE)
        self.ds.flush()

    def on_timeout(self, now: float) -> None:
        """Called by the proxy's deadline sweep once `try_deadline` has passed."""
        if self.finished:
            return
        proxy = self.ds.proxy
        if self.backoff is not None and now < self.deadline:
            self.try_deadline = self.deadline  # waiting to retry: only the overall deadline counts
            return
        proxy.stats.upstream_timeouts += 1
        if now < self.deadline and not self.resp_started and self._may_retry("timeout"):
            # Per-try timeout with retries left: a fresh attempt on a new connection, same overall deadline.
            self._end_attempt(GATEWAY_FAILURE)
            self._retry()
            return
        self._end_attempt(GATEWAY_FAILURE)
        self.deadline = self.try_deadline = float("inf")
        if self.resp_started:
            self.flags = flags.UT
            self.keep_alive = False
            self.finish(abort=True)
        else:
            self.reply(504, b"upstream request timeout\n", (), self._exhausted(flags.UT))
        self.ds.flush()

    def _next_target(self) -> tuple[str, int] | None:
        """Where a retry goes: the cluster's next endpoint (the original destination stays the same)."""
        if self.cluster is not None and self.balancer is not None:
            picked = self._pick()
            if picked is None:
                return None
            self.upstream_addr = picked
            self.upstream_key = None
        return self.upstream_addr

    def _rearm_request(self) -> None:
        """What a new attempt sends: the head and the buffered body again, framed as before; body bytes still
        to come are appended by on_request_body as usual."""
        out = [self.head]
        for data in self.body_copy or ():
            out.append(chunk(data) if self.req_chunked else data)
        if self.req_chunked and self.req_done:
            out.append(LAST_CHUNK)
        self.up_out = out

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
        if not self.req_done or self.ds.proxy.draining:
            self.keep_alive = False
        self.bytes_tx = 0 if self.is_head else len(body)
        self.ds.out.append(
            local_reply(status, body, headers, close=not self.keep_alive, head_only=self.is_head)
        )
        self.resp_started = True
        self._drop_upstream()
        self.finish()

    def _drop_upstream(self) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.exchange = None
            conn.close()

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
            if self.cb_held & _HELD_REQUEST:
                breaker.release(REQUESTS)
            for _ in range(self.retries_held):
                breaker.release(RETRIES)
            self.cb_held = self.retries_held = 0
        proxy.stats.requests_active -= 1
        self.up_out.clear()
        self.headers = []
        duration = (_perf() - self.t0) * 1000
        self.duration_ms = int(duration)
        proxy.stats.record_response(self.status, duration, self.bytes_rx, self.bytes_tx)
        proxy.log.append(self)
        self.ds.exchange_done(self, abort)
