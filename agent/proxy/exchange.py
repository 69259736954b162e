"""One proxied request/response: routing, admission, the upstream attempt, response re-framing, the log record.

An Exchange is driven by callbacks from the downstream connection (request parsed, body bytes, request
complete, client gone) and from its upstream connection (response head, body, complete, lost). It never
awaits: no Task per request. Outgoing bytes are collected in lists and written once per event, so a small
request/response costs one send() each way.
"""

from __future__ import annotations

import itertools
import random
import time
from typing import TYPE_CHECKING

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.balancer import normalise_ip
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
from planemesh.agent.proxy.routing import redirect_location, split_target

if TYPE_CHECKING:
    from planemesh.agent.config import Cluster
    from planemesh.agent.proxy.downstream import Downstream
    from planemesh.agent.proxy.upstream import UpstreamConnection

_perf = time.perf_counter
_getrandbits = random.getrandbits
RETRY_ON_TIMEOUT = frozenset({"5xx", "gateway-error", "reset"})
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
        "body_streamed",
        "bytes_rx",
        "bytes_tx",
        "cluster",
        "conn",
        "connect_task",
        "connection_values",
        "deadline",
        "ds",
        "ds_framing",
        "duration_ms",
        "finished",
        "flags",
        "has_xfp",
        "head",
        "headers",
        "is_head",
        "keep_alive",
        "method_b",
        "pending",
        "plane",
        "req_chunked",
        "req_done",
        "req_length",
        "request_id",
        "resp_started",
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
        """The request head is complete and it is this connection's turn: admit, route, go upstream."""
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
        router = table.router
        ds = self.ds
        if ds.table is not table:  # first request of the connection, or a new snapshot since
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
        route = result.route
        cluster = result.cluster
        if result.weighted:
            cluster = table.balancer.cluster_for(route.action)  # type: ignore[union-attr, arg-type]
        if cluster is None:
            if result.cluster_missing:
                return self.reply(503, b"no healthy upstream\n", (), flags.UF)
            if ds.loops_to_self:
                return self.reply(404, b"", (), flags.NR)  # not intercepted: would forward to ourselves
            target = (normalise_ip(ds.local[0]), ds.local[1])
        else:
            target = table.balancer.pick(cluster, ds.local)
            if target is None:
                return self.reply(503, b"no healthy upstream\n", (), flags.UF)
        self.upstream_addr = target
        self.cluster = cluster
        self.tries_left = sla.retries
        self.head = self._request_head(route)
        self.up_out.insert(0, self.head)
        timeout = result.timeout_s
        if timeout:
            now = proxy.loop.time()
            self.deadline = now + timeout
            per_try = sla.per_try_timeout_s
            self.try_deadline = min(self.deadline, now + per_try) if per_try else self.deadline
            proxy.watch_deadline(self)
        self.t_upstream = _perf()
        proxy.pool.acquire_for(self, target, result.connect_timeout_s)

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
        parts = [self.method_b, b" ", target, b" HTTP/1.1\r\n"]
        append_headers(parts, headers, drop)
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
        self.up_out.append(chunk(data) if self.req_chunked else data)

    def on_request_complete(self) -> None:
        self.req_done = True
        if self.req_chunked and not self.finished:
            self.up_out.append(LAST_CHUNK)

    def flush_upstream(self) -> None:
        conn = self.conn
        if conn is not None and self.up_out and conn.ready:
            data = b"".join(self.up_out) if len(self.up_out) > 1 else self.up_out[0]
            self.up_out.clear()
            conn.transport.write(data)

    # ---- upstream side ----------------------------------------------------------------------------

    def on_connected(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.exchange = self
        self.flush_upstream()
        self.ds.resume_for_buffer()

    def on_connect_failed(self, timed_out: bool) -> None:
        stats = self.ds.proxy.stats
        stats.upstream_connect_failures += 1
        if self.tries_left > 0 and "connect-failure" in self.ds.proxy.sla.retry_on and not self.body_streamed:
            self.tries_left -= 1
            stats.retries += 1
            self.ds.proxy.pool.acquire_for(self, self._next_target(), self.ds.proxy.sla.connect_timeout_s)
            return
        self.reply(503, b"upstream connect error\n", (), flags.UF if self.tries_left == self.ds.proxy.sla.retries
                   else flags.UF + "," + flags.URX)
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
        if status >= 500 and self.tries_left > 0 and self.req_done and not self.body_streamed:
            retry_on = self.ds.proxy.sla.retry_on
            if "5xx" in retry_on or ("gateway-error" in retry_on and status in (502, 503, 504)):
                self.retry_now()  # this response is dropped with its connection
                return
        self.upstream_ms = int((_perf() - self.t_upstream) * 1000)
        self.status = status
        self.resp_started = True
        self.up_keep_alive = up_keep_alive
        drop = HOP_BY_HOP if connection_values is None else dropped_names(connection_values)
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
        proxy = self.ds.proxy
        # A pooled connection the server had already closed: safe to try once more on a fresh one
        # when nothing of the body was sent; SLA retries on reset follow the same rule.
        if not self.body_streamed and (conn.reused or (self.tries_left > 0 and "reset" in proxy.sla.retry_on)):
            if not conn.reused:
                self.tries_left -= 1
                proxy.stats.retries += 1
            self._rearm_request()
            proxy.pool.connect_for(self, self._next_target(), proxy.sla.connect_timeout_s)
            return
        self.reply(503, b"upstream connect error or disconnect/reset before headers\n", (), flags.UC)
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
        proxy.stats.upstream_timeouts += 1
        if (now < self.deadline and self.tries_left > 0 and not self.body_streamed and not self.resp_started
                and proxy.sla.retry_on & RETRY_ON_TIMEOUT):
            # Per-try timeout with retries left: a fresh attempt on a new connection, same overall deadline.
            self.tries_left -= 1
            proxy.stats.retries += 1
            self._drop_upstream()
            self.try_deadline = min(self.deadline, now + (proxy.sla.per_try_timeout_s or 0.0))
            self._rearm_request()
            proxy.pool.connect_for(self, self._next_target(), proxy.sla.connect_timeout_s)
            return
        self.deadline = self.try_deadline = float("inf")
        if self.resp_started:
            self.flags = flags.UT
            self.keep_alive = False
            self.finish(abort=True)
        else:
            self.reply(504, b"upstream request timeout\n", (), flags.UT)
        self.ds.flush()

    def retry_now(self) -> None:
        proxy = self.ds.proxy
        self.tries_left -= 1
        proxy.stats.retries += 1
        self._drop_upstream()
        self._rearm_request()
        proxy.pool.connect_for(self, self._next_target(), proxy.sla.connect_timeout_s)

    def _next_target(self) -> tuple[str, int]:
        """Where a retry goes: the cluster's next endpoint (the original destination stays the same)."""
        if self.cluster is not None:
            picked = self.ds.proxy.table.balancer.pick(self.cluster, self.ds.local)
            if picked is not None:
                self.upstream_addr = picked
                self.upstream_key = None
        return self.upstream_addr  # type: ignore[return-value]

    def _rearm_request(self) -> None:
        """What a new attempt sends: the head again (retries only happen before any body byte went out)."""
        self.up_out = [self.head, LAST_CHUNK] if self.req_chunked and self.req_done else [self.head]

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
        proxy.stats.requests_active -= 1
        self.up_out.clear()
        self.headers = []
        duration = (_perf() - self.t0) * 1000
        self.duration_ms = int(duration)
        proxy.stats.record_response(self.status, duration, self.bytes_rx, self.bytes_tx)
        proxy.log.append(self)
        self.ds.exchange_done(self, abort)
