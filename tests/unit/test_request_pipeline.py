"""The request pipeline's deciding steps (agent/proxy/pipeline.py) and the retry state (retry.Retries), pure and
codec-neutral: what each step answers for a request, table by table. The codecs that drive them (HTTP/1.1, h2)
are tested end to end in tests/proxy/test_traffic_*.py, one test body per protocol."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType, SimpleNamespace

import pytest

from planemesh.agent.proxy import pipeline
from planemesh.agent.proxy.circuit import RETRIES, CircuitBreaker
from planemesh.agent.proxy.limits import bucket_for
from planemesh.agent.proxy.retry import Retries
from planemesh.agent.proxy.server import RoutingTable
from planemesh.agent.proxy.stats import PlaneStats
from planemesh.model.config import (
    CircuitBreakers,
    Cluster,
    ClusterKind,
    DirectResponse,
    Endpoint,
    FaultFilter,
    HashPolicy,
    HeaderMatch,
    LocalRateLimit,
    Redirect,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfig,
    RouteMatch,
    VirtualHost,
    WeightedCluster,
)
from planemesh.model.planes import SLA
from tests.proxy.proxy_harness import PLANE, make_snapshot

PORT = 15001
EPS = [Endpoint(address="10.0.0.1", port=80), Endpoint(address="10.0.0.2", port=80)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def proxy_with(routes: tuple[Route, ...], *, filters=(), sla: SLA | None = None, **cluster_kw) -> SimpleNamespace:
    """A ProxyState (what the pipeline reads of PlaneProxy) over a one-listener snapshot."""
    sla = sla or SLA()
    clusters = {"svc": Cluster(name="svc", kind=ClusterKind.STATIC, endpoints=tuple(EPS), **cluster_kw),
                "canary": Cluster(name="canary", kind=ClusterKind.STATIC, endpoints=(EPS[1],)),
                "orig": Cluster(name="orig", kind=ClusterKind.ORIGINAL_DST)}
    snap = make_snapshot(PORT, [], sla=sla, routes=routes, clusters=clusters)
    rc = RouteConfig(name="rc", virtual_hosts=(VirtualHost(name="all", domains=("*",), routes=routes),))
    snap = replace(snap, listeners=(replace(snap.listeners[0], http_filters=tuple(filters)),),
                   routes=MappingProxyType({"rc": rc}))
    clock = Clock()
    table = RoutingTable(snap, PLANE, clock)
    return SimpleNamespace(stats=PlaneStats(), sla=sla, bucket=bucket_for(sla, clock), table=table, clock=clock)


def no_headers() -> dict[str, str]:
    return {}


def headers_of(**kw: str):
    return lambda: {k.replace("_", "-"): v for k, v in kw.items()}


def crc_of(proxy) -> object:
    return proxy.table.router.route_config("127.0.0.1", PORT)


def to_svc(**kw) -> tuple[Route, ...]:
    return (Route(action=RouteAction(cluster="svc", **kw)),)


# ---- step 1: admission -----------------------------------------------------------------------------------------

def test_admission_counts_and_refuses_past_the_plane_limit() -> None:
    proxy = proxy_with(to_svc(), sla=SLA(max_requests=2))
    assert pipeline.admission(proxy, no_headers) is None and pipeline.admission(proxy, no_headers) is None
    local = pipeline.admission(proxy, no_headers)
    assert (local.status, local.flag, local.headers) == (503, "UO", [(b"x-planemesh-overloaded", b"requests")])
    assert (proxy.stats.requests_total, proxy.stats.requests_active, proxy.stats.overloaded) == (3, 3, 1)


@pytest.mark.parametrize(("active", "priority", "want"), [
    (0, "31", None),  # no pressure: every priority goes
    (7, "31", None),  # 8 of 10 in flight: not above 80 %
    (8, "31", b"priority"),  # 9 of 10: above 80 %, a low-priority message is shed
    (8, "16", b"priority"),
    (8, "15", None),  # higher priority keeps the remaining room
    (8, "0", None),
    (8, None, None),  # no header: not an SBI message, not shed early
    (8, "bogus", None),  # malformed: ignored
    (9, "0", None),  # the last slot
    (10, "0", b"requests"),  # past max_requests: everything
])
def test_admission_sheds_low_priority_sbi_messages_first(active, priority, want) -> None:
    proxy = proxy_with(to_svc(), sla=SLA(max_requests=10))
    proxy.stats.requests_active = active
    headers = headers_of(**{"3gpp_sbi_message_priority": priority}) if priority is not None else no_headers
    local = pipeline.admission(proxy, headers)
    assert (local.headers[0][1] if local is not None else None) == want


# ---- step 2: listener filters ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("filters", "headers", "roll", "want"), [
    ((), no_headers, 0.5, None),
    ((FaultFilter(abort_status=503, abort_percent=100),), no_headers, 0.5, (503, "FI")),
    ((FaultFilter(abort_status=503, abort_percent=10),), no_headers, 0.5, None),  # the roll misses 10 %
    ((FaultFilter(header_controlled=True),), headers_of(x_envoy_fault_abort_request="418"), 0.5, (418, "FI")),
    ((FaultFilter(header_controlled=True),), headers_of(x_envoy_fault_abort_request="bogus"), 0.5, None),
    ((FaultFilter(delay_s=0.2, delay_percent=100),), no_headers, 0.5, ("delay", 0.2, None)),
    ((FaultFilter(delay_s=0.2, delay_percent=100, abort_status=500, abort_percent=100),), no_headers, 0.5,
     ("delay", 0.2, 500)),
    ((LocalRateLimit(1, 1, 60.0), FaultFilter(abort_status=503, abort_percent=100)), no_headers, 0.5, (503, "FI")),
])
def test_listener_filters(filters, headers, roll, want) -> None:
    proxy = proxy_with(to_svc(), filters=filters)
    step = pipeline.listener_filters(proxy, crc_of(proxy), headers, lambda: roll)
    if want is None:
        assert step is None
    elif want[0] == "delay":
        assert type(step) is pipeline.Delay and (step.delay_s, step.abort_status) == want[1:]
    else:
        assert type(step) is pipeline.Local and (step.status, step.flag) == want


def test_listener_rate_limit_then_plane_bucket() -> None:
    proxy = proxy_with(to_svc(), filters=(LocalRateLimit(2, 2, 60.0),))
    steps = [pipeline.listener_filters(proxy, crc_of(proxy), no_headers, lambda: 0.5) for _ in range(3)]
    assert steps[:2] == [None, None]
    assert (steps[2].status, steps[2].body, steps[2].flag) == (429, b"local_rate_limited", "RL")
    assert dict(steps[2].headers)[b"x-ratelimit-limit"] == b"2"
    plane = proxy_with(to_svc(), sla=SLA(rate_limit_rps=1, rate_limit_burst=1))
    assert pipeline.listener_filters(plane, None, no_headers, lambda: 0.5) is None
    local = pipeline.listener_filters(plane, None, no_headers, lambda: 0.5)
    assert (local.status, local.flag) == (429, "RL") and plane.stats.rate_limited == 1


# ---- step 3: route -------------------------------------------------------------------------------------------

ROUTES = (
    Route(match=RouteMatch(prefix="/direct"), action=None, direct_response=DirectResponse(418, b"teapot\n")),
    Route(match=RouteMatch(prefix="/old"), action=None, redirect=Redirect(path="/new", code=308)),
    Route(match=RouteMatch(prefix="/away"), action=None, redirect=Redirect(host="b.example", scheme="https")),
    Route(match=RouteMatch(prefix="/limited"), action=RouteAction(cluster="svc"),
          rate_limit=LocalRateLimit(1, 1, 60.0)),
    Route(match=RouteMatch(prefix="/v", headers=(HeaderMatch(name="x-v", exact="2"),)),
          action=RouteAction(cluster="canary")),
    Route(match=RouteMatch(prefix="/api"), action=RouteAction(cluster="svc")),
)


@pytest.mark.parametrize(("target", "headers", "want"), [
    (b"/direct", no_headers, (418, b"teapot\n", "", None)),
    (b"/old/x?q=1", no_headers, (308, b"", "", "http://front/new")),
    (b"/away/x?q=1", no_headers, (301, b"", "", "https://b.example/away/x?q=1")),
    (b"/nowhere", no_headers, (404, b"", "NR", None)),
    (b"/api/x", no_headers, "svc"),
    (b"/v", headers_of(x_v="2"), "canary"),
    (b"/v", headers_of(x_v="3"), (404, b"", "NR", None)),
])
def test_route(target, headers, want) -> None:
    proxy = proxy_with(ROUTES)
    step = pipeline.route(proxy, crc_of(proxy), "front", target, headers)
    if isinstance(want, str):
        assert step.forward and step.cluster.name == want
    else:
        assert type(step) is pipeline.Local
        assert (step.status, step.body, step.flag) == want[:3]
        assert dict(step.headers).get(b"location") == (want[3].encode() if want[3] else None)


def test_route_rate_limit_has_its_own_bucket() -> None:
    proxy = proxy_with(ROUTES)
    crc = crc_of(proxy)
    assert pipeline.route(proxy, crc, "front", b"/limited", no_headers).forward
    local = pipeline.route(proxy, crc, "front", b"/limited", no_headers)
    assert (local.status, local.flag) == (429, "RL")
    assert pipeline.route(proxy, crc, "front", b"/api", no_headers).forward  # another route: unlimited


def test_connect_not_enabled_is_403_and_closes() -> None:
    proxy = proxy_with(to_svc())
    local = pipeline.route(proxy, crc_of(proxy), "", b"example.com:443", no_headers, connect=True)
    assert (local.status, local.close) == (403, True)


# ---- step 4: upstream (cluster, retry policy, breaker, hash key) ------------------------------------------------

def upstream_of(proxy, target=b"/", headers=no_headers, peer="10.9.9.9"):
    result = pipeline.route(proxy, crc_of(proxy), "front", target, headers)
    return pipeline.upstream(proxy, result, headers, peer)


def test_upstream_weighted_split_and_policies() -> None:
    split = (Route(action=RouteAction(weighted=(WeightedCluster("svc", 3), WeightedCluster("canary", 1)))),)
    proxy = proxy_with(split, sla=SLA(retries=2))
    names = [upstream_of(proxy).cluster.name for _ in range(8)]
    assert names.count("svc") == 6 and names.count("canary") == 2
    assert upstream_of(proxy).policy.num_retries == 2  # the plane SLA's, the route has none
    own = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=5)
    assert upstream_of(proxy_with(to_svc(retry=own))).policy is own


def test_upstream_breaker_holds_one_request_unit() -> None:
    proxy = proxy_with(to_svc(), circuit_breakers=CircuitBreakers(max_requests=1))
    first = upstream_of(proxy)
    assert type(first) is pipeline.Upstream and first.breaker is not None
    second = upstream_of(proxy)
    assert (second.status, second.flag, second.headers) == (503, "UO", [(b"x-planemesh-overloaded",
                                                                         b"cluster_requests")])
    first.breaker.release("requests")
    assert type(upstream_of(proxy)) is pipeline.Upstream


@pytest.mark.parametrize(("policy", "headers", "peer", "same_as"), [
    ((HashPolicy(header="x-user"),), headers_of(x_user="ann"), "10.0.0.9", (headers_of(x_user="ann"), "10.0.0.8")),
    ((HashPolicy(source_ip=True),), no_headers, "10.0.0.9", (headers_of(x_user="bob"), "::ffff:10.0.0.9")),
])
def test_upstream_hash_key(policy, headers, peer, same_as) -> None:
    proxy = proxy_with(to_svc(hash_policy=policy))
    key = upstream_of(proxy, headers=headers, peer=peer).hash_key
    assert key is not None and key == upstream_of(proxy, headers=same_as[0], peer=same_as[1]).hash_key
    assert upstream_of(proxy_with(to_svc()), headers=headers, peer=peer).hash_key is None  # no policy: no key


# ---- step 5: pick -------------------------------------------------------------------------------------------

def test_pick_endpoint_or_original_destination() -> None:
    proxy = proxy_with(to_svc())
    balancer = proxy.table.balancer
    svc = proxy.table.snapshot.clusters["svc"]
    picked = {pipeline.pick(balancer, svc, None, ("1.2.3.4", 9))[0] for _ in range(4)}
    assert picked == {("10.0.0.1", 80), ("10.0.0.2", 80)}
    orig = proxy.table.snapshot.clusters["orig"]
    assert pipeline.pick(balancer, orig, None, ("::ffff:1.2.3.4", 9)) == (("1.2.3.4", 9), None)


# ---- retries (retry.Retries) ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("retry_on", "condition", "status", "replayable", "want"), [
    ({"5xx"}, "status", 503, True, True),
    ({"5xx"}, "status", 404, True, False),
    ({"5xx"}, "reset", 0, True, True),
    ({"5xx"}, "status", 503, False, False),  # the body cannot be sent again
    ({"gateway-error"}, "status", 500, True, False),
    ({"gateway-error"}, "connect-failure", 0, True, True),
    ({"connect-failure"}, "timeout", 0, True, False),
    ({"reset"}, "timeout", 0, True, True),
])
def test_retries_cover(retry_on, condition, status, replayable, want) -> None:
    retries = Retries(RetryPolicy(retry_on=frozenset(retry_on), num_retries=1), None)
    assert retries.may_retry(condition, status, replayable) is want


def test_retries_count_down_and_hold_the_budget() -> None:
    breaker = CircuitBreaker(CircuitBreakers(max_retries=1))
    retries = Retries(RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=3, backoff_base_s=0.1), breaker)
    assert retries.may_retry("status", 503)
    assert 0 <= retries.next_backoff(0.99) < 0.1 and retries.tries_left == 2
    assert not retries.may_retry("status", 503)  # the cluster's retry budget (max_retries=1) is spent
    assert retries.exhausted("") == "URX" and retries.exhausted("UF") == "UF,URX"
    retries.release()
    assert breaker.counts[RETRIES] == 0
    assert Retries(RetryPolicy(num_retries=0), None).exhausted("UT") == "UT"
