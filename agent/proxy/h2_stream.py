"""One h2 request stream (h2_stream.Bridge): the h2 server side's driver of the request pipeline (pipeline.py),
as exchange.Exchange is HTTP/1.x's. It runs the same steps and hands the request to the same parts: an Attempt
(attempts.py: endpoint, breakers, retries, per-try timeouts, outlier reports; an HTTP/1.1 connection of the
proxy's UpstreamPool, or an h2_upstream.H2ClientStream for an http2 cluster) and a ResponseRelay (response.py),
for which the Bridge is the downstream codec (contracts.DownstreamSink: the response as h2 frames on this stream).
Errors the proxy generates for `content-type: application/grpc` requests are gRPC statuses (trailers-only).

Flow control is end to end: the client's request DATA is acknowledged once handed to the upstream stream while it
takes more (contracts.RequestSource); response bytes read for the client count against its connection's buffer
budget (h2_guard.py), and an upstream stream is not read while the budget is full (its h2 window, or TCP, holds
the server back).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import h2.errors

from planemesh.agent.proxy import accesslog, pipeline
from planemesh.agent.proxy.accesslog import AccessRecord
from planemesh.agent.proxy.attempt_stage import local_mirrors, local_stage
from planemesh.agent.proxy.attempts import FINISHED, Attempt
from planemesh.agent.proxy.authz import rbac_denial
from planemesh.agent.proxy.balancer import normalise_ip
from planemesh.agent.proxy.filters import DELAY_INJECTED
from planemesh.agent.proxy.h2_fields import local_answer, mutated_request, split_request
from planemesh.agent.proxy.http1 import HOP_BY_HOP_H2, TRAILER_DROP
from planemesh.agent.proxy.messages import RequestHead, h1_request_bytes
from planemesh.agent.proxy.mirror import mirror_targets, shadow_request
from planemesh.agent.proxy.overload import SHED_HEADERS
from planemesh.agent.proxy.request_head import header_map
from planemesh.agent.proxy.response import ResponseRelay
from planemesh.agent.proxy.response_h2 import H2ResponseWriter
from planemesh.agent.proxy.retry import Retries, rng
from planemesh.agent.proxy.upstream_request import UpstreamRequest
from planemesh.agent.proxy.xfcc import XFCC

if TYPE_CHECKING:
    import asyncio

    from planemesh.agent.proxy.contracts import Fields
    from planemesh.agent.proxy.contracts import H2Client as H2Downstream
    from planemesh.model.config import Route

__all__ = ["HOP_BY_HOP_H2", "Bridge"]  # HOP_BY_HOP_H2: the one set, for h2 request fields

_perf = time.perf_counter
_INTERNAL_ERROR = h2.errors.ErrorCodes.INTERNAL_ERROR


class Bridge:
    """One request stream of an h2 client connection; its access-log record is built when it finishes, like an
    Exchange's."""

    __slots__ = (
        "attempt",
        "authority_b",
        "bytes_rx",
        "client",
        "duration_ms",
        "fields",
        "finished",
        "flags",
        "grpc",
        "held",
        "method_b",
        "mirror_to",
        "no_body",
        "path_b",
        "proxy",
        "pseudo",
        "relay",
        "req_chunked",
        "req_done",
        "req_head",
        "req_length",
        "rid",
        "route",
        "routed",
        "sid",
        "start_time",
        "status",
        "t0",
        "timer",
        "unacked",
        "up_authority",
        "up_path",
        "up_paused",
        "upreq",
        "writer",
    )

    protocol = "HTTP/2"
    xff = None
    user_agent = None
    version = "2"
    tunnel = 0  # no upgrade or CONNECT tunnels on h2 streams: a 101 from an upstream is a protocol error
    upgrade = b""
    expect_continue = 0
    upstream_window = 0  # request bytes an upstream stream may hold unsent: none (the client's window waits)
    # A slow client does not pause an upstream stream directly: what is read for it counts against its
    # connection's buffer budget, and the response writer (response_h2.py) pauses and resumes the upstream by it.
    write_paused = False

    def __init__(self, client: H2Downstream, sid: int, headers: Fields) -> None:
        self.client = client
        self.proxy = client.proxy
        self.sid = sid
        pseudo, fields, method, path, authority, grpc, rid = split_request(headers, client.peer_ip_b, client.transport)
        self.pseudo = pseudo
        self.fields = fields
        self.method_b = method
        self.path_b = path
        self.authority_b = authority
        self.grpc = grpc
        self.rid = rid
        self.status = 0
        self.finished = False
        self.t0 = _perf()
        self.start_time = time.time()
        self.bytes_rx = 0
        self.flags = ""
        self.duration_ms = 0
        self.route: Route | None = None
        self.timer: asyncio.TimerHandle | None = None  # a fault delay
        self.up_path = path  # :path and :authority upstream (after the route's rewrites)
        self.up_authority = authority
        # the request upstream (what the Attempt replays and flushes, as an Exchange's)
        self.held: list[bytes] | None = None  # request DATA before the stream is routed (a fault delay): not acked
        self.no_body = False  # END_STREAM came with the request's HEADERS
        self.req_done = False  # the client's end of the stream arrived
        self.req_head: RequestHead | None = None  # built for an HTTP/1.1 upstream only (h2: attempt.h2_fields)
        self.routed = False  # the request goes upstream (else DATA is held: a fault delay)
        self.req_length = 0
        self.req_chunked = False  # a body of unknown length (HTTP/1.1 upstream: chunked)
        self.unacked = 0  # request bytes received and not acknowledged to the client yet
        self.up_paused = False  # the upstream stream is not taking the request body
        self.mirror_to: list[tuple[str, int]] | None = None  # shadow copies to send once the request has ended
        self.attempt = Attempt(self, self)
        self.upreq = UpstreamRequest(self.attempt)  # the request as it goes upstream, its replay copy
        self.writer = H2ResponseWriter(self)  # the response as this stream's frames (contracts.DownstreamSink)
        self.relay = ResponseRelay(self, self.writer, self)
        self.relay.is_head = method == b"HEAD"

    # ---- what the Attempt, the relay and the upstream streams see (contracts.RequestSource) -------------------

    @property
    def ds(self) -> Bridge:
        return self

    @property
    def local(self) -> tuple[str, int]:
        return self.client.local

    @property
    def transport(self):  # the client connection's (its TLS peer: access log, Istio metrics)
        return self.client.transport

    @property
    def headers(self) -> Fields:
        return self.fields

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
        return self.proxy.plane_name

    @property
    def upstream_host(self) -> str | None:
        return self.attempt.upstream_host

    @property
    def upstream_ms(self) -> int | None:
        return self.relay.upstream_ms

    @property
    def bytes_tx(self) -> int:
        return self.relay.bytes_tx

    # ---- the pipeline's steps -----------------------------------------------------------------------------

    def start(self, ended: bool) -> None:
        """Run the request through the pipeline's steps (pipeline.py); this method only turns their answers into
        h2 (or gRPC) answers; the Attempt opens the upstream stream."""
        self.no_body = self.req_done = ended
        proxy = self.proxy
        local = pipeline.admission(proxy, self._header_map)
        if local is not None:
            return self.answer(local)
        overload = proxy.overload
        if not overload.keep_alive or proxy.draining:  # memory or connection pressure: as overload_gate for h1
            self.client.stop_keep_alive()
            why = overload.refuse()  # memory, or the node's overload
            if why is not None:
                proxy.stats.shed_requests += 1
                return self.local_error(503, "overloaded", accesslog.OM, extra=SHED_HEADERS[why])
        route_config = pipeline.connection_route_config(self.client, proxy.table)
        step = pipeline.listener_filters(proxy, route_config, self._header_map, rng.random, self._rbac_denied)
        if step is not None:
            if type(step) is pipeline.Delay:
                self.flags = DELAY_INJECTED
                self.timer = proxy.loop.call_later(step.delay_s, self._after_delay, step.abort_status)
                return None
            return self.answer(step)  # type: ignore[arg-type]
        return self._route(route_config)

    def _rbac_denied(self, rbac, view: pipeline.ServerView | None = None) -> str | None:
        """The listener's RBAC filters (Istio AuthorizationPolicy, authz.py) on this stream: why denied, or None.
        `view`: the request as a local server pod's inbound stage sees it (pipeline.local_inbound)."""
        client = self.client
        method = self.method_b.decode("latin-1")
        if view is not None:
            return rbac_denial(self.proxy, rbac, view.headers, method, view.target, view.authority, view.local,
                               client.peer_ip_b.decode(), client.transport, view.principal)  # fmt: skip
        authority = self.authority_b.decode("latin-1") if self.authority_b else ""
        return rbac_denial(self.proxy, rbac, self._header_map, method, (self.path_b or b"/").decode("latin-1"),
                           authority, client.local, client.peer_ip_b.decode(), client.transport)

    def _after_delay(self, abort_status: int | None) -> None:
        self.timer = None
        if self.finished:
            return
        if abort_status is not None:
            self.answer(pipeline.fault_abort(abort_status, delayed=True))
        else:
            self._route()

    def answer(self, local: pipeline.Local) -> None:
        """A pipeline step's local answer as an h2 response (a gRPC status for gRPC requests)."""
        self.reply(local.status, local.body, local.headers, local.flag)

    def _route(self, crc=None) -> None:
        """Route, then the upstream. `crc`: the connection's route config, when the caller looked it up already."""
        proxy = self.proxy
        table = proxy.table
        if crc is None:
            crc = pipeline.connection_route_config(self.client, table)
        crc = crc or table.router.original_destination
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
                self.timer = proxy.loop.call_later(step.delay_s, self._after_delay, step.abort_status)
                return None
            if step is not None:
                return self.answer(step)  # type: ignore[arg-type]
        return self._upstream(crc, result, route)  # type: ignore[arg-type]

    def _upstream(self, crc, result: pipeline.RouteResult, route: Route | None) -> None:
        """Cluster and endpoint choice (pipeline.upstream, the attempt's pick), a local server pod's inbound
        routes (pipeline.local_inbound), then the first attempt: the same steps as exchange.Exchange._upstream."""
        proxy = self.proxy
        client = self.client
        attempt = self.attempt
        attempt.balancer = proxy.table.balancer
        up = pipeline.upstream(proxy, result, self._header_map, client.peer_ip_b)  # type: ignore[arg-type]
        if type(up) is pipeline.Local:
            return self.answer(up)
        policy = up.policy  # type: ignore[union-attr]
        if policy.num_retries:
            attempt.retries = Retries(policy, up.breaker)  # type: ignore[union-attr]
        cluster = up.cluster  # type: ignore[union-attr]
        if cluster is None:
            if result.cluster_missing or result.weighted:  # Envoy: 503, empty, NC
                return self.answer(pipeline.NO_CLUSTER)
            if client.local[1] in proxy.listen_ports:
                return self.answer(pipeline.NO_HEALTHY_UPSTREAM)  # not intercepted: would forward to ourselves
            target = (normalise_ip(client.local[0]), client.local[1])
        else:
            attempt.h2 = cluster.http2 or cluster.downstream_protocol  # this client speaks h2
            picked = attempt.take_cluster(up)  # type: ignore[arg-type]
            if picked is None:
                return self.answer(pipeline.NO_HEALTHY_UPSTREAM)
            target = picked
        attempt.upstream_addr = target
        if crc.local_client:  # a local client pod's request: a local server pod's inbound stage may follow
            authority = self.authority_b.decode("latin-1") if self.authority_b else ""
            step = local_stage(attempt, crc, result, authority, self.path_b or b"/", self._header_map,
                               self._rbac_denied, client.peer_ip)  # fmt: skip
            if type(step) is pipeline.Local:
                return self.answer(step)
            if step is not None:
                result = step
                route = self.route = result.route
        self.pseudo, self.fields, self.up_path, self.up_authority = mutated_request(
            route, self.pseudo, self.fields, self.path_b, self.authority_b, crc.trace
        )  # the route's rewrites and header changes, this hop's trace context (h2_fields.py)
        stage = attempt.stage
        if stage is not None and stage.xfcc is not None:  # a local server stage's x-forwarded-client-cert
            self.fields.append((XFCC, stage.xfcc))
        self._request_head()
        action = route.action if route is not None else None
        if action is not None and action.mirrors and cluster is not None:
            self._mirror(action.mirrors)
        attempt.start_clock(result.timeout_s, policy.per_try_timeout_s, result.connect_timeout_s)
        attempt.open(target, reuse=True)
        if self.mirror_to and self.req_done and not self.finished:
            self._send_mirrors()

    def _request_head(self) -> None:
        """The request head upstream, then what the stream held while it was not routed. An h2 upstream gets
        the stream's own fields (pseudo-headers first; connection-specific ones were dropped by split_request),
        re-encoded as they are; an HTTP/1.1 upstream the codec-neutral head (messages.RequestHead: Host from
        :authority, content-length as the body's length)."""
        attempt = self.attempt
        h2 = attempt.h2
        host = self.up_authority
        length = -1
        fields: Fields = []
        for field in self.fields:
            n = field[0]
            if n == b"content-length":
                length = int(field[1])  # validated by the h2 codec
            elif h2:
                continue
            elif n == b"host":
                if host is None:
                    host = field[1]
            elif n != b"te":  # te: trailers is hop-by-hop on HTTP/1.1
                fields.append(field)
        self.req_length = max(length, 0)
        upreq = self.upreq
        self.req_chunked = upreq.chunked = not self.no_body and length < 0
        if h2:
            attempt.h2_fields = self.pseudo + self.fields
        else:
            if host is not None:
                fields.insert(0, (b"host", host))
            head = self.req_head = RequestHead(self.method_b or b"GET", self.up_path or b"/", fields,
                                               self.req_length, self.req_chunked)
            upreq.head = h1_request_bytes(head)
            upreq.out.append(upreq.head)
        self.routed = True
        held, self.held = self.held, None
        for data in held or ():  # a list only when DATA came before routing
            upreq.body(data)
        if self.req_done and upreq.chunked:  # (a body of known length, or none, has no end of its own)
            upreq.end()

    def _mirror(self, mirrors) -> None:
        """Shadow copies (HTTP/1.1) of the request, sent once it has ended; a body past MAX_REPLAY_BODY is not
        mirrored. The primary never waits for them."""
        proxy = self.proxy
        targets = mirror_targets(mirrors, proxy.table.snapshot.clusters, proxy.table.balancer, rng.random)
        if self.attempt.local_client is not None:  # a local client pod's request (attempt_stage.py)
            targets = local_mirrors(self.attempt, targets)
        if targets:
            self.mirror_to = targets

    def _send_mirrors(self) -> None:
        targets, self.mirror_to = self.mirror_to, None
        copy = self.upreq.body_copy
        if not targets or copy is None:
            return
        request = shadow_request(self.method_b, self.up_path or b"/", self.up_authority or b"", self.fields,
                                 b"".join(copy))
        sender = self.proxy.mirrors()
        for addr in targets:
            sender.send(addr, request)

    def _header_map(self) -> dict[str, str]:
        return header_map(self.fields)

    # ---- the request body, from the client (h2_downstream.H2Downstream's events) ------------------------------

    def on_data(self, side, data: bytes, flow_len: int) -> None:
        n = len(data)
        self.bytes_rx += n
        if flow_len > n:
            self.client.ack(self.sid, flow_len - n)  # padding: nothing to forward
        self.unacked += n
        if not self.routed:  # not routed yet (a fault delay): kept, unacknowledged (the window bounds it)
            if self.held is None:
                self.held = [data]
            else:
                self.held.append(data)
            return
        self.upreq.body(data)
        self.upreq.flush()
        self._credit()

    def on_trailers(self, side, trailers: Fields) -> None:
        # as on the HTTP/1 path: hop-by-hop and framing fields, and Host (trailers must not route) are dropped
        self.upreq.trailers = [(n, v) for n, v in ((n.lower(), v) for n, v in trailers)
                               if n not in TRAILER_DROP and n[:1] != b":"]
        self.on_end(side)

    def on_end(self, side) -> None:
        if self.req_done:
            return  # END_STREAM came with the headers or the trailers already
        self.req_done = True
        if not self.routed:
            return  # routed later: the end goes after what is held
        self.upreq.end()
        self.upreq.flush()
        if self.mirror_to:
            self._send_mirrors()

    def flush_upstream(self) -> None:
        self.upreq.flush()

    def _credit(self) -> None:
        """Acknowledge what the upstream stream took, while it takes more: the client may send as much again."""
        n = self.unacked
        if n and not self.up_paused and self.attempt.conn is not None:
            self.unacked = 0
            self.client.ack(self.sid, n)

    def pause_for_upstream(self) -> None:
        self.up_paused = True

    def resume_for_upstream(self) -> None:
        self.up_paused = False
        if not self.finished:  # an upstream connection closing late (its paused_ds) finds nothing to credit
            self._credit()

    def replayable(self) -> bool:
        return self.upreq.replayable()

    def rearm(self) -> None:
        self.upreq.rearm(self.req_done)

    def upstream_buffered(self) -> int:
        """Bytes held for this stream (H2Downstream.buffered_bytes): the request on its way upstream and its
        replay copy, the response read but not handed on, and what the upstream connection has not sent."""
        upreq = self.upreq
        n = upreq.buffered() + self.writer.pending_bytes()
        if upreq.body_copy is not None:
            n += upreq.body_len
        conn = self.attempt.conn
        if conn is not None:
            if self.attempt.h2:
                n += conn.buffered()  # type: ignore[attr-defined]
            elif conn.transport is not None:
                n += conn.transport.get_write_buffer_size()
        return n

    def flush(self) -> None:
        """An upstream stream read and parsed a piece of the response: pass its body on."""
        if self.writer.pending and not self.finished:
            self.writer.flush()

    def resume_for_buffer(self) -> None:
        """The upstream stream is open (Attempt.on_connected): its reading slot is decided afresh, and what the
        client sent meanwhile is acknowledged."""
        self.writer.connected()
        self._credit()

    # ---- endings ------------------------------------------------------------------------------------------

    def on_reset(self, side, code: int) -> None:
        """The client reset the stream (or its connection went): the upstream stream is cancelled, and a
        connection still being opened for it is not opened (rapid reset must not fan out to the upstream)."""
        if self.finished:
            return
        task = self.attempt.connect_task
        if task is not None and not task.done():
            task.cancel()
        self.flags = accesslog.DC if not self.flags else self.flags + "," + accesslog.DC
        self.finish(abort=True, by_client=True)

    def overloaded(self, which: bytes) -> None:
        self.proxy.stats.overloaded += 1
        self.reply(503, b"overloaded\n", [(b"x-planemesh-overloaded", which)], accesslog.UO)

    def abort(self, flag: str) -> None:
        """The response started and cannot complete: the stream is reset."""
        self.flags = flag
        self.client.reset(self.sid, _INTERNAL_ERROR)
        self.finish(abort=True)

    def reply(self, status: int, body: bytes, headers=(), flag: str = "") -> None:
        """Answer locally (errors, redirects, direct responses) unless a response has already started."""
        if self.finished:
            return
        if self.relay.started:
            return self.abort(flag)
        self.attempt.drop()
        self.local_error(status, body.decode("latin-1").strip() or str(status), flag, body, headers)
        return None

    def local_error(self, status: int, message: str, flag: str, body: bytes | None = None, extra=()) -> None:
        """A proxy-generated answer: an HTTP status, or a trailers-only gRPC status for gRPC requests. `body`: a
        direct response's own body (else the message and a newline); `extra`: more response fields."""
        self.status = self.relay.status = status
        self.relay.started = True
        self.flags = flag
        head, body = local_answer(status, message, self.grpc, body, extra)
        self.client.respond(self.sid, head, body is None)
        if body is not None:
            self.relay.bytes_tx = len(body)
            self.client.send(self.sid, body, True)
        self.finish()

    def finish(self, abort: bool = False, by_client: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        attempt = self.attempt
        if abort:
            attempt.drop()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        attempt.release()
        client = self.client
        if self.unacked:  # the connection's window gets back what the stream took and did not forward
            client.ack(self.sid, self.unacked)
            self.unacked = 0
        self.writer.close()
        self.upreq.out = []
        proxy = self.proxy
        client.bridges.pop(self.sid, None)
        client.stream_done(self, by_client)
        stats = proxy.stats
        stats.requests_active -= 1
        duration_ms = (_perf() - self.t0) * 1000
        self.duration_ms = int(duration_ms)
        stats.record_response(self.status, duration_ms, self.bytes_rx, self.relay.bytes_tx, self.flags)
        # with the peers' identities (agent/proxy/istio_stats.py)
        proxy.istio.record(proxy, self, attempt.cluster, attempt.endpoint, attempt.upstream_addr, self.status,
                           duration_ms)
        relay = self.relay
        log = proxy.log
        if log.enabled:  # the access record, built now (the stream and its parts are not kept for it)
            authority = self.authority_b
            log.append(AccessRecord(
                self.start_time, self.method_b.decode("latin-1") or "-", self.path_b.decode("latin-1") or "-",
                self.protocol, self.status, self.flags, self.bytes_rx, relay.bytes_tx, self.duration_ms,
                relay.upstream_ms, None, None, self.rid.decode("latin-1"),
                authority.decode("latin-1") if authority else None, attempt.upstream_host, proxy.plane_name, client,
                attempt.local_peer,
            ))  # the properties' values, inline (once per stream)
        # Its parts see a finished request from now on, and none refers back to it: the stream and its parts are
        # freed by reference counting when it ends, not by the cyclic GC (whose passes grow with what survives).
        attempt.ex = attempt.ds = relay.ex = relay.ds = FINISHED  # type: ignore[assignment]
