"""The deciding steps of the request pipeline, codec-neutral and sans-IO (docs/traffic.md, "Order of a request").

Every downstream codec (HTTP/1.1: exchange.py; HTTP/2: h2_stream.py's Bridge) runs a request through the same
steps, in this order, and only turns their answers into its own framing:

    local = admission(proxy)                                        # 1. the plane's request limit
    step = listener_filters(proxy, crc, headers, roll)              # 2. plane bucket, listener rate limits, faults
    step = route(proxy.table, crc, authority, target, headers)      # 3. route; redirect, direct response, no route,
                                                                    #    the route's own rate limit
    step = route_fault(route.fault, headers, roll)                  # 3b. the route's own fault
    up = upstream(proxy, result, headers, peer_ip)                  # 4. cluster (weights), retry policy, breaker
                                                                    #    hold, hash key
    addr, ep = pick(balancer, cluster, hash_key, original_dst)      # 5. endpoint (locality, outlier state)
    step = local_inbound(proxy, crc, addr, result, authority, target, headers)
                                                                    # 6. a local server pod's inbound routes

An answer is data: None (go on), a `Local` reply (status, body, headers, access-log flag), a `Delay` (fault
delay) or the step's result. Nothing here reads or writes a socket or arms a timer; state touched is counters
and token buckets. The request head is read through `headers`, a callable returning lower-case name -> value
(built only when a filter or route looks at headers). What the codecs call back into is described by
`typing.Protocol`s here, so this module imports no codec (no import cycle).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.authz import DENIED_BODY
from planemesh.agent.proxy.balancer import normalise_ip, request_hash
from planemesh.agent.proxy.circuit import REQUESTS
from planemesh.agent.proxy.filters import DELAY_INJECTED, FAULT_INJECTED, fault_decision
from planemesh.agent.proxy.limits import rate_limited_headers
from planemesh.agent.proxy.local_inbound import headers_seen_by_server, seen_by_server
from planemesh.agent.proxy.retry import rng, sla_retry
from planemesh.agent.proxy.routing import redirect_location, split_target
from planemesh.model.config import ClusterKind

if TYPE_CHECKING:
    from planemesh.agent.proxy.balancer import Balancer
    from planemesh.agent.proxy.circuit import CircuitBreaker
    from planemesh.agent.proxy.filters import FilterChain
    from planemesh.agent.proxy.limits import TokenBucket
    from planemesh.agent.proxy.routing import CompiledRouteConfig, PlaneRouter, RouteResult
    from planemesh.agent.proxy.stats import PlaneStats
    from planemesh.model.config import Cluster, Endpoint, FaultFilter, RetryPolicy, Route
    from planemesh.model.planes import SLA

Headers = Callable[[], Mapping[str, str]]
Field = tuple[bytes, bytes]


class Table(Protocol):
    """What the pipeline reads of one snapshot's routing table (server.RoutingTable)."""

    router: PlaneRouter
    balancer: Balancer

    def route_limiter(self, route: Route): ...


class RoutedConnection(Protocol):
    """What the pipeline keeps on a client connection (HTTP/1.1 Downstream, H2Downstream): the route config of
    its original destination, looked up once per connection and snapshot."""

    local: tuple[str, int]
    peer_ip: str  # a local workload's outbound listeners are chosen by it (Listener.sources)
    table: Table | None
    route_config: object


def connection_route_config(ds: RoutedConnection, table: Table):
    """The connection's route config in `table`: cached on the connection until a new snapshot arrives."""
    if ds.table is not table:  # first request of the connection, or a new snapshot since
        ds.table = table
        transport = getattr(ds, "transport", None)  # TLS terminated: the permissive port's TLS twin routes it
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        ds.route_config = table.router.route_config(ds.local[0], ds.local[1], ds.peer_ip, tls)
    return ds.route_config


class ProxyState(Protocol):
    """What the pipeline reads of the plane's proxy (server.PlaneProxy)."""

    stats: PlaneStats
    sla: SLA
    bucket: TokenBucket | None
    table: Table
    clock: Callable[[], float]


class Local:
    """Answer the request locally: `status`, `body`, extra `headers`, the access-log `flag`; `close`: the
    connection cannot carry another request (a refused CONNECT may be followed by tunnel bytes)."""

    __slots__ = ("body", "close", "flag", "headers", "status")

    def __init__(self, status: int, body: bytes, headers=(), flag: str = "", close: bool = False) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.flag = flag
        self.close = close

    def __repr__(self) -> str:
        return f"Local({self.status}, {self.body!r}, {self.flag!r})"


class Delay:
    """A fault filter holds the request `delay_s`, then aborts it with `abort_status` or lets it go on."""

    __slots__ = ("abort_status", "delay_s")

    def __init__(self, delay_s: float, abort_status: int | None) -> None:
        self.delay_s = delay_s
        self.abort_status = abort_status


class Upstream:
    """Where a routed request goes: its cluster (None: the original destination), the retry policy, the circuit
    breaker whose REQUESTS unit it holds (release it when the request ends), the hash key for the endpoint."""

    __slots__ = ("breaker", "cluster", "hash_key", "policy")

    def __init__(self, cluster: Cluster | None, policy: RetryPolicy, breaker: CircuitBreaker | None,
                 hash_key: int | None) -> None:
        self.cluster = cluster
        self.policy = policy
        self.breaker = breaker
        self.hash_key = hash_key


def overloaded(which: bytes) -> Local:
    return Local(503, b"overloaded\n", [(b"x-planemesh-overloaded", which)], flags.UO)


def fault_abort(abort_status: int, delayed: bool = False) -> Local:
    return Local(abort_status, b"fault filter abort", (), DELAY_INJECTED + "," + FAULT_INJECTED if delayed
                 else FAULT_INJECTED)


NO_ROUTE = Local(404, b"", (), flags.NR)
NO_HEALTHY_UPSTREAM = Local(503, b"no healthy upstream\n", (), flags.UF)
NO_CLUSTER = Local(503, b"", (), flags.NC)  # the route's cluster is not in the snapshot (Envoy: empty body, NC)
RBAC_DENIED = Local(403, DENIED_BODY)
CONNECT_DISABLED = Local(403, b"CONNECT is not enabled on this listener\n", close=True)


# 5G SBI message priority (3GPP TS 29.500 5.2.3.2.x, `3gpp-Sbi-Message-Priority`: 0 highest .. 31 lowest). Under
# pressure, that is more than SBI_PRESSURE_FRACTION of the plane's max_requests in flight, a message that says
# its priority is SBI_SHED_PRIORITY or lower (value >= 16) is refused at once (503 UO, `x-planemesh-overloaded:
# priority`), keeping the remaining room for higher-priority messages. Messages without the header are not
# affected. Envoy has no equivalent (an SCP does this); 0.8 matches the overload manager's soft level (80%).
SBI_PRIORITY = "3gpp-sbi-message-priority"
SBI_PRESSURE_FRACTION = 0.8
SBI_SHED_PRIORITY = 16


def sbi_priority(headers: Headers) -> int | None:
    """The request's SBI message priority, None when absent or malformed (a bad header never fails a request)."""
    raw = headers().get(SBI_PRIORITY)
    if raw is None:
        return None
    raw = raw.split(",")[0].strip()
    return int(raw) if raw.isdigit() and len(raw) <= 2 else None


def admission(proxy: ProxyState, headers: Headers) -> Local | None:
    """Step 1: the request is counted (the caller counts it done when it ends); past the plane's limit: 503 UO;
    under pressure, low-priority SBI messages are shed first (SBI_SHED_PRIORITY)."""
    stats = proxy.stats
    stats.requests_total += 1
    active = stats.requests_active = stats.requests_active + 1
    limit = proxy.sla.max_requests
    if active > limit:
        stats.overloaded += 1
        return overloaded(b"requests")
    if active > limit * SBI_PRESSURE_FRACTION:
        priority = sbi_priority(headers)
        if priority is not None and priority >= SBI_SHED_PRIORITY:
            stats.overloaded += 1
            return overloaded(b"priority")
    return None


def listener_filters(
    proxy: ProxyState, crc: CompiledRouteConfig | None, headers: Headers, roll: Callable[[], float],
    rbac_denied: Callable[[Any], str | None] | None = None,
) -> Local | Delay | None:
    """Step 2: the plane's token bucket, then the listener's HTTP filters in order: RBAC (`rbac_denied(filters)`,
    the codec's view of the request's connection and head, authz.py: 403), local rate limits, faults."""
    bucket = proxy.bucket
    if bucket is not None and not bucket.take():
        proxy.stats.rate_limited += 1
        return Local(429, b"local rate limited\n", rate_limited_headers(bucket), flags.RL)
    if crc is None or not crc.http_filters:
        return None
    chain = crc.filter_chain(proxy.clock)
    if chain.rbac and rbac_denied is not None and rbac_denied(chain.rbac):
        return RBAC_DENIED
    limited = _filter_rate_limits(proxy, chain)
    if limited is not None:
        return limited
    if chain.faults:
        hmap = headers()
        for fault in chain.faults:
            decision = fault_decision(fault, hmap, roll)
            if decision.delay_s:
                return Delay(decision.delay_s, decision.abort_status)
            if decision.abort_status is not None:
                return fault_abort(decision.abort_status)
    return None


def _filter_rate_limits(proxy: ProxyState, chain: FilterChain) -> Local | None:
    """A listener's local rate limit filters, in order: 429 from the first whose bucket is empty."""
    for limiter in chain.limiters:
        if not limiter.take():
            proxy.stats.rate_limited += 1
            return Local(429, b"local_rate_limited", limiter.headers(), flags.RL)
    return None


def route(
    proxy: ProxyState, crc: CompiledRouteConfig, authority: str, target: bytes, headers: Headers,
    connect: bool = False,
) -> Local | RouteResult:
    """Step 3: the route of the request, or the local answer when it is not forwarded (direct response,
    redirect, no route, CONNECT not enabled) or the route's own rate limit refuses it."""
    table = proxy.table
    result = table.router.route_request(crc, authority, target, headers, connect)
    if not result.forward:
        if connect and result.direct is None and result.redirect is None and not crc.upgrade_allowed(None, "connect"):
            return CONNECT_DISABLED
        return not_forwarded(result, authority, target)
    rt = result.route
    if rt is not None and rt.rate_limit is not None:  # the route's own bucket, after the listener's
        return _route_rate_limit(proxy, rt) or result
    return result


def not_forwarded(result: RouteResult, authority: str, target: bytes) -> Local:
    """The local answer of a result that does not forward: its direct response, its redirect, else 404 NR."""
    if result.direct is not None:
        return Local(result.direct.status, result.direct.body)
    if result.redirect is not None:
        path, query = split_target(target.decode("latin-1"))
        loc = redirect_location(result.redirect, "http", authority, path, query)
        return Local(result.redirect.code, b"", [(b"location", loc.encode("latin-1"))])
    return NO_ROUTE


def _route_rate_limit(proxy: ProxyState, rt: Route) -> Local | None:
    """The route's own local rate limit: 429 when its bucket is empty."""
    limiter = proxy.table.route_limiter(rt)
    if limiter.take():
        return None
    proxy.stats.rate_limited += 1
    return Local(429, b"local_rate_limited", limiter.headers(), flags.RL)


def route_fault(fault: FaultFilter, headers: Headers, roll: Callable[[], float]) -> Local | Delay | None:
    """Step 3b: the route's own fault (Istio VirtualService fault, typed_per_filter_config), after routing. The
    caller runs it once: after a delay it routes again without it."""
    decision = fault_decision(fault, headers(), roll)
    if decision.delay_s:
        return Delay(decision.delay_s, decision.abort_status)
    if decision.abort_status is not None:
        return fault_abort(decision.abort_status)
    return None


def upstream(proxy: ProxyState, result: RouteResult, headers: Headers, peer_ip: str | bytes) -> Local | Upstream:
    """Step 4: the cluster (a weighted split picks per request), the retry policy (the route's, else the plane
    SLA's), a REQUESTS unit of the cluster's circuit breaker (open: 503 UO), the hash policy's key."""
    balancer = proxy.table.balancer
    action = result.route.action if result.route is not None else None
    cluster = result.cluster
    if result.weighted:
        cluster = balancer.cluster_for(action)  # type: ignore[arg-type]
    policy = action.retry if action is not None and action.retry is not None else sla_retry(proxy.sla)
    if cluster is None:
        return Upstream(None, policy, None, None)
    breaker = balancer.breaker(cluster)
    if not breaker.try_acquire(REQUESTS):
        proxy.stats.overloaded += 1
        return overloaded(b"cluster_requests")
    hash_key = None
    if action is not None and action.hash_policy:
        peer = peer_ip.decode() if type(peer_ip) is bytes else peer_ip
        hash_key = request_hash(action.hash_policy, headers, peer)  # type: ignore[arg-type]
    return Upstream(cluster, policy, breaker, hash_key)


def pick(
    balancer: Balancer, cluster: Cluster, hash_key: int | None, original_dst: tuple[str, int]
) -> tuple[tuple[str, int], Endpoint | None] | None:
    """Step 5: the endpoint of an attempt (the lb's pick among healthy, not ejected endpoints; an ORIGINAL_DST
    cluster: the original destination). The attempt is open on the endpoint until `balancer.report()`."""
    if cluster.kind is ClusterKind.ORIGINAL_DST:
        return (normalise_ip(original_dst[0]), original_dst[1]), None
    ep = balancer.start_endpoint(cluster, hash_key)
    if ep is None:
        return None
    return (ep.address, ep.port), ep


def local_inbound(
    proxy: ProxyState, crc: CompiledRouteConfig, addr: tuple[str, int], result: RouteResult, authority: str,
    target: bytes, headers: Headers, rbac_denied: Callable[[Any, ServerView], str | None] | None = None,
    principal: str | None = None,
) -> Local | RouteResult | Staged | None:
    """Step 6: a local client's request whose endpoint `addr` is a local workload with an inbound listener meets
    that workload's inbound stage, as its sidecar would after the client's (local_inbound.py), on the request as
    it arrives there (the client's rewrites and header changes applied, the endpoint as destination): its HTTP
    filters (RBAC through `rbac_denied(filters, view)`: 403; local rate limits; fault aborts), then its routes:
    a direct response, a redirect or no route (404 NR) answers; the route's own rate limit and its inbound
    cluster's request limit (a REQUESTS unit, held in the result's `inbound_hold` until the request ends:
    Attempt.inbound_hold) apply; its route's fault aborts; else the chained route (both routes' rewrites and
    header changes, the server route's retry policy as `inbound_retry`) with the tighter timeout, `Staged`
    when a fault delay (its listener's fault filter, else its route's) holds it first. `principal`: the client
    pod's SPIFFE ID from the node's pod table (PlaneRouter.principal_of), what RBAC sees as the peer. None:
    no such stage."""
    router = proxy.table.router
    inbound = router.local_inbound(crc, addr[0], addr[1])
    route = result.route
    if inbound is None or route is None:
        return None
    authority, target = seen_by_server(route, authority, target)
    headers = headers_seen_by_server(route, headers)
    delay = None
    if inbound.http_filters:
        view = ServerView(addr, authority, target.decode("latin-1"), headers, principal)
        refused = _server_filters(proxy, inbound, view, rbac_denied)
        if type(refused) is Delay:
            delay = refused
        elif refused is not None:
            return refused  # type: ignore[return-value]
    second = router.route_request(inbound, authority, target, headers)
    if not second.forward:
        return not_forwarded(second, authority, target)
    inbound_route = second.route
    assert inbound_route is not None  # a forwarded result has its route
    if inbound_route.rate_limit is not None:
        limited = _route_rate_limit(proxy, inbound_route)
        if limited is not None:
            return limited
    if inbound_route.fault is not None and delay is None:  # the server route's fault (its VirtualService's)
        step = route_fault(inbound_route.fault, headers, rng.random)
        if type(step) is Local:
            return step
        delay = step
    held = None
    if second.cluster is not None and (delay is None or delay.abort_status is None):
        held = proxy.table.balancer.breaker(second.cluster)  # the inbound request limit: shared with remote clients
        if not held.try_acquire(REQUESTS):
            proxy.stats.overloaded += 1
            return overloaded(b"cluster_requests")
    chained = router.chained_result(result, second, held)
    return chained if delay is None else Staged(chained, delay)  # type: ignore[arg-type]


class Staged(NamedTuple):
    """A server stage whose fault delay holds the request first (then aborts it or lets it go on): step 6's
    answer, carried out by the Attempt (Attempt.open waits `delay.delay_s`)."""

    result: RouteResult
    delay: Delay


class ServerView(NamedTuple):
    """The request as a local server pod's inbound stage sees it: the endpoint as its destination, the
    authority, target and headers after the client's route (what RBAC evaluates there)."""

    local: tuple[str, int]
    authority: str
    target: str
    headers: Headers
    principal: str | None = None  # the local client pod's SPIFFE ID (the node's pod table), None: unknown


def _server_filters(proxy: ProxyState, inbound: CompiledRouteConfig, view: ServerView,
                    rbac_denied: Callable[[Any, ServerView], str | None] | None) -> Local | Delay | None:  # fmt: skip
    """The server's inbound HTTP filters in step 6: RBAC, local rate limits, faults (an abort answers, a delay
    is returned: the Attempt holds the request before its upstream attempt, pipeline.Staged)."""
    chain = inbound.filter_chain(proxy.clock)
    if chain.rbac and rbac_denied is not None and rbac_denied(chain.rbac, view):
        return RBAC_DENIED
    limited = _filter_rate_limits(proxy, chain)
    if limited is not None:
        return limited
    if chain.faults:
        hmap = view.headers()
        for fault in chain.faults:
            decision = fault_decision(fault, hmap, rng.random)
            if decision.delay_s:
                return Delay(decision.delay_s, decision.abort_status)
            if decision.abort_status is not None:
                return fault_abort(decision.abort_status)
    return None
