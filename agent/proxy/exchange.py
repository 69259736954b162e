"""One proxied request/response: admission, filters, routing, the request body, the log record, the ending.

An Exchange is driven by callbacks from the downstream connection (request parsed, body bytes, request
complete, client gone) and from its upstream connection (response head, body, complete, lost). It never
awaits: no Task per request. Outgoing bytes are collected in lists and written once per event, so a small
request/response costs one send() each way.

An Exchange is composed of parts that own their state, the same parts an h2 stream (h2_stream.Bridge) uses: its
Attempt (attempts.py: endpoint, upstream stream, breaker holds, retries, timers), its UpstreamRequest
(upstream_request.py: the request body on its way, its replay copy), its ResponseRelay (response.py) with the
HTTP/1.x response writer (response_h1.py), and the access-log record built once it is finished
(accesslog.AccessRecord). The upstream request head is request_head.py's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy import pipeline
from planemesh.agent.proxy.accesslog import AccessRecord
from planemesh.agent.proxy.attempt_stage import local_mirrors, local_stage
from planemesh.agent.proxy.attempts import FINISHED, Attempt
from planemesh.agent.proxy.authz import rbac_denial
from planemesh.agent.proxy.balancer import normalise_ip
from planemesh.agent.proxy.connect_target import connect_refusal
from planemesh.agent.proxy.filters import DELAY_INJECTED
from planemesh.agent.proxy.http1 import (
    CONTINUE,
    chunk,
    local_reply,
)
from planemesh.agent.proxy.istio_stats import ISTIO_CLUSTER_PREFIXES
from planemesh.agent.proxy.messages import RequestHead, h1_request_bytes
from planemesh.agent.proxy.mirror import mirror_targets, shadow_head
from planemesh.agent.proxy.request_checks import CONTINUE_SENT, EXPECT_NONE
from planemesh.agent.proxy.request_head import header_map, new_request_id, request_head
from planemesh.agent.proxy.response import ResponseRelay
from planemesh.agent.proxy.response_h1 import H1ResponseWriter
from planemesh.agent.proxy.retry import MAX_REPLAY_BODY, Retries, backoff_s, rng
from planemesh.agent.proxy.tunnel import TUNNEL_CONNECT, open_connect
from planemesh.agent.proxy.upstream_request import UpstreamRequest
from planemesh.agent.proxy.xfcc import XFCC

if TYPE_CHECKING:
    import asyncio

    from planemesh.agent.proxy.contracts import ClientConn as Downstream
    from planemesh.model.config import Route

__all__ = ["Exchange", "backoff_s", "new_request_id"]  # backoff_s, new_request_id: re-exported for callers

_perf = time.perf_counter
_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}  # the access log's protocol field, without an f-string


class Exchange:
    __slots__ = (
        "attempt",
        "authority",
        "bytes_rx",
        "connect_to",
        "connection_values",
        "ds",
        "expect_continue",
        "finished",
        "flags",
        "has_xfp",
        "headers",
        "is_head",
        "keep_alive",
        "method_b",
        "mirror_to",
        "relay",
        "req_chunked",
        "req_done",
        "req_head",
        "req_length",
        "request_id",
        "route",
        "start_time",
        "t0",
        "t_tunnel",
        "target",
        "timer",
        "tunnel",
        "upgrade",
        "upreq",
        "user_agent",
        "version",
        "xff",
    )

    def __init__(self, ds: Downstream) -> None:
        self.ds = ds
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
        self.has_xfp = False
        self.expect_continue = EXPECT_NONE  # request_checks: EXPECT_CONTINUE until the 100 is sent
        self.flags = ""
        self.bytes_rx = 0
        self.req_head: RequestHead | None = None  # the same, codec-neutral (messages.py)
        self.finished = False
        self.route: Route | None = None
        self.timer: asyncio.TimerHandle | None = None  # a fault delay
        self.mirror_to: list[tuple[str, int]] | tuple = ()  # a list once the route mirrors (no list per request)
        self.attempt = Attempt(self)
        self.upreq = UpstreamRequest(self.attempt)  # the request as it goes upstream, its replay copy
        self.relay = ResponseRelay(self, H1ResponseWriter(self))

    # ---- the request line, as logs show it ------------------------------------------------------------

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
        """The request head is complete and it is this connection's turn: admit, filter, route, go upstream
        (the steps of pipeline.py; this method only turns their answers into HTTP/1.1)."""
        ds = self.ds
        proxy = ds.proxy
        headers = self._header_map
        local = pipeline.admission(proxy, headers)
        if local is not None:
            return self.answer(local)
        if not proxy.overload.keep_alive and proxy.overload_gate(self):  # memory/connection pressure
            return None
        route_config = pipeline.connection_route_config(ds, proxy.table)
        if route_config is not None and not route_config.http_filters and proxy.bucket is None:
            return self._route(route_config)  # no plane bucket, no listener filter: step 2 has nothing to do
        step = pipeline.listener_filters(proxy, route_config, headers, rng.random, self._rbac_denied)
        if step is not None:
            if type(step) is pipeline.Delay:
                self.flags = DELAY_INJECTED
                self.timer = proxy.loop.call_later(step.delay_s, self._after_delay, step.abort_status)
                return None
            return self.answer(step)  # type: ignore[arg-type]
        return self._route(route_config)

    def _rbac_denied(self, rbac, view: pipeline.ServerView | None = None) -> str | None:
        """The listener's RBAC filters (Istio AuthorizationPolicy, authz.py) on this request: why denied, or None.
        `view`: the request as a local server pod's inbound stage sees it (pipeline.local_inbound)."""
        ds = self.ds
        if view is not None:
            return rbac_denial(ds.proxy, rbac, view.headers, self.method, view.target, view.authority, view.local,
                               ds.peer_ip, ds.transport, view.principal)  # fmt: skip
        return rbac_denial(ds.proxy, rbac, self._header_map, self.method, self.target.decode("latin-1"),
                           self.authority or "", ds.local, ds.peer_ip, ds.transport)

    def _after_delay(self, abort_status: int | None) -> None:
        self.timer = None
        if self.finished:
            return
        if abort_status is not None:
            self.answer(pipeline.fault_abort(abort_status, delayed=True))
        else:
            self._route(pipeline.connection_route_config(self.ds, self.ds.proxy.table))
            self.flush_upstream()
        self.ds.flush()

    def answer(self, local: pipeline.Local) -> None:
        """A pipeline step's local answer, as an HTTP/1.1 reply."""
        if local.close:
            self.keep_alive = False
        self.reply(local.status, local.body, local.headers, local.flag)

    def _route(self, crc) -> None:
        """Steps 3-5; `crc`: the connection's route config (None: the plane's original-destination one)."""
        proxy = self.ds.proxy
        if crc is None:
            crc = proxy.table.router.original_destination
        connect = self.tunnel == TUNNEL_CONNECT
        result = pipeline.route(proxy, crc, self.authority or "", self.target, self._header_map, connect)
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
        if self.tunnel and not crc.upgrade_allowed(route, self.upgrade_type):
            kind = b"CONNECT" if connect else b"upgrade to " + self.upgrade.strip()
            return self.refuse(kind + b" is not allowed on this route\n")
        return self._upstream(crc, result, route, connect)  # type: ignore[arg-type]

    def _upstream(self, crc, result: pipeline.RouteResult, route: Route | None, connect: bool) -> None:
        """Cluster and endpoint choice (pipeline.upstream, the attempt's pick), a local server pod's inbound
        routes (pipeline.local_inbound), then the first attempt."""
        ds = self.ds
        proxy = ds.proxy
        attempt = self.attempt
        attempt.balancer = proxy.table.balancer
        up = pipeline.upstream(proxy, result, self._header_map, ds.peer_ip)
        if type(up) is pipeline.Local:
            return self.answer(up)
        policy = up.policy  # type: ignore[union-attr]
        if policy.num_retries:
            attempt.retries = Retries(policy, up.breaker)  # type: ignore[union-attr]
        cluster = up.cluster  # type: ignore[union-attr]
        if cluster is None:
            if result.cluster_missing or result.weighted:  # Envoy: 503, empty, NC
                return self.answer(pipeline.NO_CLUSTER)
            if not connect and ds.loops_to_self:
                return self.answer(pipeline.NO_ROUTE)  # not intercepted: would forward to ourselves
            # the original destination, never the client's authority for a CONNECT (connect_target.py)
            target = (normalise_ip(ds.local[0]), ds.local[1])
        else:
            attempt.h2 = cluster.http2 and not self.tunnel
            picked = attempt.take_cluster(up)  # type: ignore[arg-type]  # ORIGINAL_DST: for a CONNECT too
            if picked is None:
                return self.answer(pipeline.NO_HEALTHY_UPSTREAM)
            target = picked
        attempt.upstream_addr = target
        if connect:
            return self._open_connect(target, result.connect_timeout_s)
        if crc.local_client:  # a local client pod's request: a local server pod's inbound stage may follow
            step = local_stage(attempt, crc, result, self.authority or "", self.target, self._header_map,
                               self._rbac_denied, ds.peer_ip)  # fmt: skip
            if type(step) is pipeline.Local:
                return self.answer(step)
            if step is not None:
                result = step
                route = self.route = result.route
        self.req_head = request_head(self, route, self.upgrade if self.tunnel else b"", crc.trace)
        stage = attempt.stage
        if stage is not None and stage.xfcc is not None:  # a local server stage's x-forwarded-client-cert
            self.req_head.fields.append((XFCC, stage.xfcc))
        upreq = self.upreq
        upreq.head = h1_request_bytes(self.req_head)  # an h2 attempt sends req_head's fields; mirrors this
        if not attempt.h2:  # an h2 stream's head is its HEADERS frame (H2ClientStream); `out` holds only the body
            upreq.out.insert(0, upreq.head)
        action = route.action if route is not None else None
        if action is not None and action.mirrors and cluster is not None and not self.tunnel:
            self._mirror(action.mirrors)
        attempt.start_clock(result.timeout_s, policy.per_try_timeout_s, result.connect_timeout_s)
        if self.expect_continue and not self.req_done:  # routed and going upstream: the client may send its body
            self.expect_continue = CONTINUE_SENT
            ds.out.append(CONTINUE)
        attempt.open(target, reuse=True)

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
        attempt = self.attempt
        refused = connect_refusal(target, attempt.cluster, self.connect_to, self.ds.proxy.listen_ports)
        if refused is not None:
            return self.refuse(refused)
        if self.request_id is None:
            self.request_id = new_request_id().decode()
        attempt.t_upstream = _perf()
        attempt.connect_timeout_s = connect_timeout_s
        open_connect(self, target[0], target[1])
        return None

    def _mirror(self, mirrors) -> None:
        """Shadow copies of a body-less (or fully buffered) request; the primary never waits for them."""
        if self.req_length > MAX_REPLAY_BODY:
            return  # a large body is not mirrored (it would have to be held); chunked ones are checked at the end
        attempt = self.attempt
        clusters = self.ds.proxy.table.snapshot.clusters
        targets = mirror_targets(mirrors, clusters, attempt.balancer, rng.random)
        self.mirror_to = local_mirrors(attempt, targets) if attempt.local_client is not None else targets
        if self.mirror_to and self.req_done:
            self._send_mirrors()

    def _send_mirrors(self) -> None:
        upreq = self.upreq
        copy = upreq.body_copy
        if copy is None:
            self.mirror_to.clear()
            return
        body = b"".join(copy)
        if self.req_chunked:
            body = (chunk(body) if body else b"") + upreq.h1_last()
        request = shadow_head(upreq.head) + body
        sender = self.ds.proxy.mirrors()
        for addr in self.mirror_to:
            sender.send(addr, request)
        self.mirror_to.clear()

    def _header_map(self) -> dict[str, str]:
        return header_map(self.headers)

    def on_request_body(self, data: bytes) -> None:
        self.bytes_rx += len(data)
        if not self.finished:
            self.upreq.body(data)

    def on_request_trailer(self, name: bytes, value: bytes) -> None:
        upreq = self.upreq
        if upreq.trailers is None:
            upreq.trailers = [(name, value)]
        else:
            upreq.trailers.append((name, value))

    def on_request_complete(self) -> None:
        self.req_done = True
        if not self.finished:
            upreq = self.upreq
            if upreq.chunked:  # a content-length body ended with its last byte (UpstreamRequest.end)
                upreq.end()
            if self.mirror_to:
                self._send_mirrors()

    def flush_upstream(self) -> None:
        self.upreq.flush()

    def replayable(self) -> bool:
        return self.upreq.replayable()

    def rearm(self) -> None:
        self.upreq.rearm(self.req_done)

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

    def abort(self, flag: str) -> None:
        """The response started and cannot complete: the client's connection closes mid-response."""
        self.flags = flag
        self.keep_alive = False
        self.finish(abort=True)

    def reply(self, status: int, body: bytes, headers=(), flag: str = "") -> None:
        """Answer locally (errors, redirects, direct responses) unless a response has already started."""
        if self.finished:
            return
        relay = self.relay
        if relay.started:
            return self.abort(flag)
        relay.status = status
        self.flags = flag
        # A body not read yet: close rather than read it to the end (tunnel requests have none). A request head
        # still in the parser's hands with no body to come (a GET's 429) keeps its connection, as Envoy does.
        unread = not self.req_done and not self.tunnel and (self.req_length or self.req_chunked)
        if unread or self.ds.proxy.draining:
            self.keep_alive = False
        relay.bytes_tx = 0 if self.is_head else len(body)
        http10 = self.version == "1.0"
        self.ds.out.append(
            local_reply(status, body, headers, close=not self.keep_alive, head_only=self.is_head, http10=http10)
        )
        relay.started = True
        self.attempt.drop()
        self.finish()
        return None

    def finish(self, abort: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        ds = self.ds
        proxy = ds.proxy
        attempt = self.attempt
        if abort:
            attempt.drop()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        attempt.release()
        stats = proxy.stats
        stats.requests_active -= 1
        self.upreq.out = []
        self.headers = []
        duration = (_perf() - self.t0) * 1000
        latency = duration if self.t_tunnel < 0 else self.t_tunnel  # a tunnel's latency: until it was open
        relay = self.relay
        status = relay.status
        stats.record_response(status, latency, self.bytes_rx, relay.bytes_tx, self.flags)
        cluster = attempt.cluster
        if cluster is not None and cluster.name.startswith(ISTIO_CLUSTER_PREFIXES):  # with the peers' identities
            proxy.istio.record(proxy, self, attempt.cluster, attempt.endpoint, attempt.upstream_addr, status, latency)
        log = proxy.log
        if log.enabled:  # the access record, built now that the request is finished
            log.append(AccessRecord(
                self.start_time, self.method_b.decode("latin-1"), self.target.decode("latin-1"),
                _PROTOCOLS.get(self.version) or f"HTTP/{self.version}", status, self.flags, self.bytes_rx,
                relay.bytes_tx, int(duration), relay.upstream_ms, self.xff, self.user_agent, self.request_id,
                self.authority, attempt.upstream_host, proxy.plane_name, ds, attempt.local_peer,
            ))
        # Its parts see a finished request from now on (late callbacks return at once), and the reference cycle
        # between them and the Exchange is broken: all are freed by reference counting, not the cyclic GC.
        attempt.ex = relay.ex = relay.sink.ex = FINISHED  # type: ignore[assignment]
        ds.exchange_done(self, abort)
