"""One h2 request stream (h2_stream.Bridge): the request pipeline (pipeline.py) driven from h2 frames, its
upstream an h2 stream on a pooled h2c connection (clusters with http2=True) or a pooled HTTP/1.1 connection
(h2_upstream.py). Errors the proxy generates for `content-type: application/grpc` requests are gRPC statuses
(trailers-only).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import h2.errors

from planemesh.agent.proxy import accesslog, h2_upstream, pipeline
from planemesh.agent.proxy.authz import rbac_denial
from planemesh.agent.proxy.balancer import normalise_ip
from planemesh.agent.proxy.circuit import REQUESTS
from planemesh.agent.proxy.filters import DELAY_INJECTED
from planemesh.agent.proxy.h2 import H2Side
from planemesh.agent.proxy.h2_fields import local_answer, mutated_request, split_request
from planemesh.agent.proxy.http1 import HOP_BY_HOP_H2, TRAILER_DROP
from planemesh.agent.proxy.mirror import mirror_targets, shadow_request
from planemesh.agent.proxy.outlier import GATEWAY_FAILURE
from planemesh.agent.proxy.overload import SHED_HEADERS
from planemesh.agent.proxy.request_head import (
    header_map,
    response_headers,
)
from planemesh.agent.proxy.retry import MAX_REPLAY_BODY, Retries, rng

if TYPE_CHECKING:
    import asyncio

    from planemesh.agent.proxy.circuit import CircuitBreaker
    from planemesh.agent.proxy.contracts import H2Client as H2Downstream
    from planemesh.model.config import Cluster, Endpoint, Route

# Response fields from an h2 upstream that never reach the client: the connection-specific ones, and te.
_RESPONSE_DROP = HOP_BY_HOP_H2 | {b"te"}
GATEWAY_FLAGS = frozenset({accesslog.UF, accesslog.UT, accesslog.UC})  # failures outlier detection counts


class Bridge:
    """One request stream: downstream h2 stream <-> an upstream (h2 stream or HTTP/1.1 connection).

    It is also its own access-log record (formatted in batches later, like an Exchange)."""

    __slots__ = (
        "authority_b", "body_copy", "body_len", "breaker", "bytes_rx", "bytes_tx", "cluster", "connect_timeout",
        "deadline", "done", "ds", "duration_ms", "endpoint", "fields", "flags", "grpc", "held", "http2", "method_b",
        "mirror_to", "path_b", "pseudo", "reopened", "req_ended", "retries", "rid", "route", "sid", "start_time",
        "status", "t0", "timer", "try_deadline", "up", "up_authority", "up_path", "up_sid", "upstream_addr",
        "upstream_host",
    )

    protocol = "HTTP/2"
    upstream_ms = None
    xff = None
    user_agent = None

    def __init__(self, ds: H2Downstream, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.ds = ds
        self.sid = sid
        pseudo, fields, method, path, authority, grpc, rid = split_request(headers, ds.peer_ip_b, ds.transport)
        self.pseudo = pseudo
        self.fields = fields
        self.method_b = method
        self.path_b = path
        self.authority_b = authority
        self.grpc = grpc
        self.rid = rid
        self.up = None  # H2Upstream or H1Stream
        self.up_sid = 0
        self.reopened = 0  # times refused by an h2 upstream (not processed) and opened again
        self.req_ended = False  # the client's end of the stream went upstream (with the headers, a DATA or trailers)
        self.status = 0
        self.done = False
        self.t0 = time.perf_counter()
        self.start_time = time.time()
        self.deadline = 0.0  # loop time; 0: none (checked by the proxy's deadline sweep)
        self.try_deadline = 0.0
        self.bytes_rx = 0
        self.bytes_tx = 0
        self.upstream_host: str | None = None
        self.flags = ""
        self.duration_ms = 0
        self.route: Route | None = None
        self.cluster: Cluster | None = None
        self.breaker: CircuitBreaker | None = None  # holds one REQUESTS unit of it until finish()
        self.endpoint: Endpoint | None = None  # the attempt's endpoint, reported to the balancer at the end
        self.timer: asyncio.TimerHandle | None = None  # a fault delay
        self.up_path = path  # :path and :authority upstream (after the route's rewrites)
        self.up_authority = authority
        self.held: list | None = None  # request DATA (data, flow length) received before the stream had an upstream
        self.retries: Retries | None = None  # the route's retries (None: no retry configured)
        self.body_copy: list | None = None  # the request body so far, kept for a retry or a mirror (bounded)
        self.body_len = 0
        self.upstream_addr: tuple[str, int] | None = None
        self.mirror_to: list[tuple[str, int]] | None = None  # shadow copies to send once the request has ended
        self.http2 = False  # the upstream speaks h2 (the cluster says http2)
        self.connect_timeout = 5.0

    # ---- access-log view (decoded when the batch is formatted) -----------------------------------------

    @property
    def method(self) -> str:
        return self.method_b.decode("latin-1") or "-"

    @property
    def path(self) -> str:
        return self.path_b.decode("latin-1") or "-"

    @property
    def authority(self) -> str | None:
        return self.authority_b.decode("latin-1") if self.authority_b else None

    @property
    def request_id(self) -> str:
        return self.rid.decode("latin-1")

    @property
    def plane(self) -> str:
        return self.ds.proxy.plane_name

    # ---- request side -------------------------------------------------------------------------------

    def start(self, ended: bool) -> None:
        """Run the request through the pipeline's steps (pipeline.py); this method only turns their answers into
        h2 (or gRPC) answers and opens the upstream stream."""
        self.req_ended = ended
        ds = self.ds
        proxy = ds.proxy
        local = pipeline.admission(proxy, self._header_map)
        if local is not None:
            return self.answer(local)
        overload = proxy.overload
        if not overload.keep_alive or proxy.draining:  # memory or connection pressure: as overload_gate for h1
            ds.stop_keep_alive()
            why = overload.refuse()  # memory, or the node's overload
            if why is not None:
                proxy.stats.shed_requests += 1
                return self.local_error(503, "overloaded", accesslog.OM, extra=SHED_HEADERS[why])
        table = proxy.table
        route_config = pipeline.connection_route_config(ds, table)
        step = pipeline.listener_filters(proxy, route_config, self._header_map, rng.random, self._rbac_denied)
        if step is not None:
            if type(step) is pipeline.Delay:
                self.flags = DELAY_INJECTED
                self.held = []
                self.timer = proxy.loop.call_later(step.delay_s, self._after_delay, step.abort_status)
                return None
            return self.answer(step)  # type: ignore[arg-type]
        return self._route()

    def _rbac_denied(self, rbac) -> str | None:
        """The listener's RBAC filters (Istio AuthorizationPolicy, authz.py) on this stream: why denied, or None."""
        ds = self.ds
        authority = self.authority_b.decode("latin-1") if self.authority_b else ""
        return rbac_denial(ds.proxy, rbac, self._header_map, self.method_b.decode("latin-1"),
                           (self.path_b or b"/").decode("latin-1"), authority, ds.local, ds.peer_ip_b.decode(),
                           ds.transport)

    def _after_delay(self, abort_status: int | None) -> None:
        self.timer = None
        if self.done:
            return
        if abort_status is not None:
            self.flags = ""
            self.answer(pipeline.fault_abort(abort_status, delayed=True))
        else:
            self._route()

    def answer(self, local: pipeline.Local) -> None:
        """A pipeline step's local answer as an h2 response (a gRPC status for gRPC requests)."""
        body = local.body
        self.local_error(local.status, body.decode("latin-1").strip() or str(local.status), local.flag, body,
                         local.headers)

    def _route(self) -> None:
        ds = self.ds
        proxy = ds.proxy
        table = proxy.table
        crc = pipeline.connection_route_config(ds, table) or table.router.original_destination
        authority = self.authority_b.decode("latin-1") if self.authority_b else ""
        result = pipeline.route(proxy, crc, authority, self.path_b or b"/", self._header_map)
        if type(result) is pipeline.Local:
            return self.answer(result)
        route = self.route = result.route  # type: ignore[union-attr]
        if route is not None and route.fault is not None and DELAY_INJECTED not in self.flags:
            # The route's fault (Istio VirtualService), after routing; a delay comes back here once, flagged.
            step = pipeline.route_fault(route.fault, self._header_map, rng.random)
            if type(step) is pipeline.Delay:
                self.flags = DELAY_INJECTED
                self.held = self.held if self.held is not None else []
                self.timer = proxy.loop.call_later(step.delay_s, self._after_delay, step.abort_status)
                return None
            if step is not None:
                return self.answer(step)  # type: ignore[arg-type]
        up = pipeline.upstream(proxy, result, self._header_map, ds.peer_ip_b)  # type: ignore[arg-type]
        if type(up) is pipeline.Local:
            return self.answer(up)
        cluster = self.cluster = up.cluster  # type: ignore[union-attr]
        if cluster is None:
            if result.cluster_missing or result.weighted:  # type: ignore[union-attr]  # Envoy: 503, empty, NC
                return self.answer(pipeline.NO_CLUSTER)
            if ds.local[1] in proxy.listen_ports:
                return self.answer(pipeline.NO_HEALTHY_UPSTREAM)
            addr = (normalise_ip(ds.local[0]), ds.local[1])
        else:
            self.breaker = up.breaker  # type: ignore[union-attr]
            picked = pipeline.pick(table.balancer, cluster, up.hash_key, ds.local)  # type: ignore[union-attr]
            if picked is None:
                return self.answer(pipeline.NO_HEALTHY_UPSTREAM)
            addr, self.endpoint = picked
        self._mutate(route)
        policy = up.policy  # type: ignore[union-attr]
        if policy.num_retries:
            self.retries = Retries(policy, up.breaker)  # type: ignore[union-attr]
            self.body_copy = []
        timeout = result.timeout_s  # type: ignore[union-attr]
        per_try = policy.per_try_timeout_s
        if timeout or per_try:
            now = proxy.loop.time()
            self.deadline = now + timeout if timeout else float("inf")
            self.try_deadline = min(self.deadline, now + per_try) if per_try else self.deadline
            proxy.watch_deadline(self)  # type: ignore[arg-type]
        self.http2 = cluster is not None and (cluster.http2 or cluster.downstream_protocol)  # this client speaks h2
        self.connect_timeout = result.connect_timeout_s  # type: ignore[union-attr]
        action = route.action if route is not None else None
        if action is not None and action.mirrors and cluster is not None:
            self._mirror(action.mirrors)
        held = self.held
        self.held = None
        self._open(addr, held or ())
        if self.mirror_to and self.req_ended:
            self._send_mirrors()

    def _open(self, addr: tuple[str, int], held, replay: bool = False) -> None:
        """One upstream attempt on `addr`: the stream opens, then `held` ((data, flow length) items; a list item:
        trailers) goes after its head, then what the client still sends. replay: `held` is the retry's copy, sent
        again as it is (its window credit went to the client already)."""
        self.upstream_addr = addr
        self.upstream_host = self.ds.proxy.pool.key_for(addr)[1]
        h2_upstream.open_stream(self, addr, self.req_ended and not held, self.http2, self.connect_timeout)
        up = self.up
        if not held or up is None:
            return
        for data, flow_len in held:
            if replay:
                if type(data) is list:
                    up.send_trailers(self, data)
                else:
                    up.send_body(self, data, False, None)
            else:
                self._forward(data, flow_len)
        if self.req_ended and type(held[-1][0]) is not list:
            up.send_body(self, b"", True, None)

    def _mirror(self, mirrors) -> None:
        """Shadow copies (HTTP/1.1) of the request, sent once it has ended; a body past MAX_REPLAY_BODY is not
        mirrored. The primary never waits for them."""
        proxy = self.ds.proxy
        targets = mirror_targets(mirrors, proxy.table.snapshot.clusters, proxy.table.balancer, rng.random)
        if not targets:
            return
        self.mirror_to = targets
        if self.body_copy is None:
            self.body_copy = []

    def _send_mirrors(self) -> None:
        targets, self.mirror_to = self.mirror_to, None
        copy = self.body_copy
        if not targets or copy is None:
            return
        body = b"".join(d for d in copy if type(d) is not list)
        request = shadow_request(self.method_b, self.up_path or b"/", self.up_authority or b"", self.fields, body)
        sender = self.ds.proxy.mirrors()
        for addr in targets:
            sender.send(addr, request)

    # ---- retries (retry.Retries decides) --------------------------------------------------------------------

    def _retry_if(self, condition: str, status: int = 0) -> bool:
        """Retry instead of answering, when the policy covers this failure and the request can be replayed."""
        retries = self.retries
        if retries is None or self.done:
            return False
        if condition == "status" and not self.req_ended:
            return False  # an early answer to a request still being sent is passed on
        if not retries.may_retry(condition, status, self.body_copy is not None):
            return False
        up = self.up
        self.up = None
        if up is not None:
            up.cancel(self)
        self._end_attempt(status if condition == "status" else GATEWAY_FAILURE)
        proxy = self.ds.proxy
        proxy.stats.retries += 1
        delay = retries.next_backoff(rng.random())
        if self.deadline:
            self.try_deadline = self.deadline  # no per-try clock runs during the back-off
        if delay < 0.001:
            self._next_attempt()
        else:
            self.timer = proxy.loop.call_later(delay, self._next_attempt)
        return True

    def _next_attempt(self) -> None:
        self.timer = None
        if self.done:
            return
        proxy = self.ds.proxy
        per_try = self.retries.policy.per_try_timeout_s  # type: ignore[union-attr]
        if self.deadline and per_try:
            self.try_deadline = min(self.deadline, proxy.loop.time() + per_try)
        addr = self.upstream_addr
        if self.cluster is not None:
            picked = pipeline.pick(proxy.table.balancer, self.cluster, None, self.ds.local)
            if picked is None:
                return self.answer(pipeline.NO_HEALTHY_UPSTREAM)
            addr, self.endpoint = picked
        copy = self.body_copy
        if copy is None:  # the body outgrew the replay buffer during the back-off
            return self.local_error(503, "upstream reset", self._exhausted(accesslog.UC))
        self._open(addr, [(d, 0) for d in copy], replay=True)  # type: ignore[arg-type]

    def _end_attempt(self, outcome: int) -> None:
        """The attempt's outcome for outlier detection: an HTTP status, 0 gateway failure, -1 none."""
        ep = self.endpoint
        if ep is not None:
            self.endpoint = None
            self.ds.proxy.table.balancer.report(self.cluster, ep, outcome)  # type: ignore[arg-type]

    def _exhausted(self, flag: str) -> str:
        return self.retries.exhausted(flag) if self.retries is not None else flag

    def upstream_buffered(self) -> int:
        """What the stream's upstream holds for it (H2Downstream.buffered_bytes)."""
        up = self.up
        return up.buffered_for(self) if up is not None else 0

    def _mutate(self, route: Route | None) -> None:
        """The route's rewrites and request header changes, and this hop's trace context (h2_fields.py)."""
        self.pseudo, self.fields, self.up_path, self.up_authority = mutated_request(
            route, self.pseudo, self.fields, self.path_b, self.authority_b
        )

    def _header_map(self) -> dict[str, str]:
        return header_map(self.fields)

    def upstream_headers(self) -> list[tuple[bytes, bytes]]:
        """The request's fields for an h2 upstream: pseudo-headers first."""
        return self.pseudo + self.fields

    def on_data(self, side: H2Side, data: bytes, flow_len: int) -> None:
        if side is self.ds:
            self.bytes_rx += len(data)
            if self.held is not None:  # not routed yet (a fault delay): kept, unacknowledged (the window bounds it)
                self.held.append((data, flow_len))
                return
            if self.up is None:
                self.ds.ack(self.sid, flow_len)
                if self.timer is not None and self.body_copy is not None:  # waiting to retry: the copy goes too
                    self.body_len += len(data)
                    if self.body_len > MAX_REPLAY_BODY:
                        self.body_copy = None
                    else:
                        self.body_copy.append(data)
                return
            self._forward(data, flow_len)
        else:  # response body from an h2 upstream
            self.bytes_tx += len(data)
            pad = flow_len - len(data)
            if pad:
                side.ack(self.up_sid, pad)
            self.ds.send(self.sid, data, False, self._ack_up)

    def _forward(self, data: bytes | list, flow_len: int) -> None:
        """Request DATA (or trailers, a list) to the upstream; the client's window is credited as it goes.
        A copy is kept while a retry may need it."""
        if type(data) is list:
            if self.body_copy is not None:
                self.body_copy.append(data)
            self.up.send_trailers(self, data)  # type: ignore[union-attr, arg-type]
            return
        copy = self.body_copy
        if copy is not None:
            self.body_len += len(data)
            if self.body_len > MAX_REPLAY_BODY:
                self.body_copy = None  # too big to replay: no retry (nor mirror) once any of it went out
            else:
                copy.append(data)
        pad = flow_len - len(data)
        if pad:
            self.ds.ack(self.sid, pad)
        self.up.send_body(self, data, False, self._ack_down)  # type: ignore[union-attr]

    def _ack_down(self, n: int) -> None:
        """n request bytes went upstream: the client may send as many more."""
        self.ds.ack(self.sid, n)

    def _ack_up(self, n: int) -> None:
        """n response bytes went to the client: the h2 upstream may send as many more."""
        up = self.up
        if up is not None:
            up.ack(self.up_sid, n)

    def on_trailers(self, side: H2Side, trailers: list[tuple[bytes, bytes]]) -> None:
        trailers = [(n.lower(), v) for n, v in trailers]
        # as on the HTTP/1 path: hop-by-hop and framing fields, and Host (trailers must not route) are dropped
        trailers = [(n, v) for n, v in trailers if n not in TRAILER_DROP and n[:1] != b":"]
        if side is self.ds:
            self.req_ended = True
            if self.held is not None:
                self.held.append((trailers, 0))
                return
            if self.body_copy is not None:
                self.body_copy.append(trailers)
            if self.up is not None:
                self.up.send_trailers(self, trailers)
            if self.mirror_to:
                self._send_mirrors()
        else:
            self.ds.send(self.sid, trailers, True)
            self.finish("")

    def on_end(self, side: H2Side) -> None:
        if side is self.ds:
            # Sending the end twice (after END_STREAM on the headers or trailers) would make h2 close the
            # upstream stream before its response arrived.
            if not self.req_ended:
                self.req_ended = True
                if self.up is not None:
                    self.up.send_body(self, b"", True, None)
                if self.mirror_to:
                    self._send_mirrors()
        elif not self.done:
            self.ds.send(self.sid, b"", True)
            self.finish("")

    def on_reset(self, side: H2Side, code: int) -> None:
        if self.done:
            return
        if side is self.ds:  # the client cancelled (e.g. a gRPC deadline): cancel upstream too
            if self.up is not None:
                self.up.cancel(self)
            self.finish(accesslog.DC)
        elif self.status == 0:
            refused = code == h2.errors.ErrorCodes.REFUSED_STREAM
            if refused and side.reopen(self):  # type: ignore[attr-defined]
                return
            self.up_failed(503 if refused else 502, "upstream reset", accesslog.UC)
        else:
            self.ds.reset(self.sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.finish(accesslog.UC)

    # ---- upstream side ------------------------------------------------------------------------------

    def on_response_headers(self, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        """A response head from an h2 upstream (not validated by h2: names lower-cased here, and connection-
        specific fields dropped, as a client would otherwise reject the stream)."""
        out = []
        status = 0
        for n, v in headers:
            n = n.lower()
            if n == b":status":
                status = int(v)
            if n not in _RESPONSE_DROP:
                out.append((n, v))
        if self.retry_status(status):
            return
        self.status = status
        self.respond(out, end)

    def retry_status(self, status: int) -> bool:
        """A response head arrived (before it is relayed): True when it is retried instead (its attempt is
        dropped). An answer the policy would retry, with no retry left, is flagged URX."""
        retries = self.retries
        if retries is None:
            return False
        if self._retry_if("status", status):
            return True
        if retries.tries_left <= 0 and (status >= 500 or status in retries.policy.retriable_status_codes):
            self.flags = accesslog.URX
        return False

    def respond(self, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        """Send a response head already fit for h2 (status set by the caller), with the route's changes."""
        route = self.route
        if route is not None and (route.response_headers_to_add or route.response_headers_to_remove):
            headers = response_headers(route, headers)
        self.ds.respond(self.sid, headers, end)
        if end:
            self.finish("")

    def up_failed(self, status: int, message: str, flag: str) -> None:
        if self.done:
            return
        if self.status:
            self.ds.reset(self.sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.finish(flag)
            return
        if self.retries is not None:
            condition = "connect-failure" if flag is accesslog.UF else "timeout" if flag is accesslog.UT else "reset"
            if self._retry_if(condition):
                return
            flag = self._exhausted(flag)
        self.local_error(status, message, flag)

    def on_timeout(self, now: float) -> None:
        """Called by the proxy's deadline sweep once `try_deadline` has passed."""
        if self.done:
            return
        if self.timer is not None and now < self.deadline:
            self.try_deadline = self.deadline  # waiting to retry: only the overall deadline counts
            return
        self.ds.proxy.stats.upstream_timeouts += 1
        if now < self.deadline and not self.status and self._retry_if("timeout"):
            return  # a per-try timeout with retries left: a fresh attempt, same overall deadline
        self.deadline = self.try_deadline = float("inf")
        if self.up is not None:
            self.up.cancel(self)
        retries, self.retries = self.retries, None  # the timeout is final: up_failed must not retry it
        flag = accesslog.UT if retries is None else retries.exhausted(accesslog.UT)
        if retries is not None:
            retries.release()
        self.up_failed(504, "upstream request timeout", flag)

    def local_error(self, status: int, message: str, flag: str, body: bytes | None = None, extra=()) -> None:
        """A proxy-generated answer: an HTTP status, or a trailers-only gRPC status for gRPC requests. `body`: a
        direct response's own body (else the message and a newline); `extra`: more response fields."""
        self.status = status
        head, body = local_answer(status, message, self.grpc, body, extra)
        self.ds.respond(self.sid, head, body is None)
        if body is not None:
            self.ds.send(self.sid, body, True)
        self.finish(flag)

    def finish(self, flag: str) -> None:
        if self.done:
            return
        self.done = True
        self.flags = flag if not self.flags else self.flags + "," + flag if flag else self.flags
        if self.up is not None:
            self.up.release(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.breaker is not None:
            self.breaker.release(REQUESTS)
            self.breaker = None
        if self.retries is not None:
            self.retries.release()
        if self.endpoint is not None:  # the attempt's outcome for outlier detection
            if flag in GATEWAY_FLAGS or flag[:2] in GATEWAY_FLAGS:
                self._end_attempt(GATEWAY_FAILURE)
            else:
                self._end_attempt(self.status if self.status and flag is not accesslog.DC else -1)
        ds = self.ds
        proxy = ds.proxy
        if self.deadline:
            proxy.inflight.discard(self)  # type: ignore[arg-type]
        ds.bridges.pop(self.sid, None)
        ds.stream_done(self, flag is accesslog.DC)
        stats = proxy.stats
        stats.requests_active -= 1
        duration_ms = (time.perf_counter() - self.t0) * 1000
        self.duration_ms = int(duration_ms)
        stats.record_response(self.status, duration_ms, self.bytes_rx, self.bytes_tx, self.flags)
        # with the peers' identities (agent/proxy/istio_stats.py)
        proxy.istio.record(proxy, self, self.cluster, self.endpoint, self.upstream_addr, self.status, duration_ms)
        proxy.log.append(self)  # type: ignore[arg-type]
