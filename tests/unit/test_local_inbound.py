"""A local client's request to a local server pod meets the server's inbound routes too (pipeline.local_inbound,
agent/proxy/local_inbound.py), as the server's sidecar would apply them after the client's: the decision, table
tested on the node snapshot the workloads merge builds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from planemesh.agent.proxy import pipeline
from planemesh.agent.proxy.circuit import REQUESTS
from planemesh.agent.proxy.local_inbound import (
    chained,
    headers_seen_by_server,
    seen_by_server,
    tighter_timeout,
    xfcc_element,
)
from planemesh.agent.proxy.pod_table import PodTable
from planemesh.agent.proxy.request_head import prefix_rewritten, response_headers, route_request_headers
from planemesh.agent.proxy.routing import RouteResult
from planemesh.agent.proxy.routing_table import RoutingTable
from planemesh.agent.workloads.merge import merge, principal
from planemesh.agent.workloads.model import Workload
from planemesh.agent.workloads.streams import trust_domain
from planemesh.model.config import (
    CircuitBreakers,
    Cluster,
    DirectResponse,
    FaultFilter,
    HeaderMatch,
    HeaderValue,
    Listener,
    ListenerProtocol,
    LocalRateLimit,
    Redirect,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfig,
    RouteMatch,
    Snapshot,
    VirtualHost,
)
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import SLA
from planemesh.model.static_config import default_config_text, load_default_config
from planemesh.model.validation import validate_snapshot
from planemesh.xds.bootstrap import bootstrap_from_dict

PLANES = load_default_config().planes  # oam 198.18.1.0/24
A = Workload("a", "default", ("198.18.1.10",))  # the client pod
B = Workload("b", "default", ("198.18.1.11",))  # the server pod
REMOTE = "198.18.1.99"  # an address no workload of the node holds
SERVER = ("198.18.1.11", 8080)


def _client_route(**kw) -> Route:
    return Route(action=RouteAction(cluster="to-b", timeout_s=kw.pop("timeout_s", 5.0),
                                    prefix_rewrite=kw.pop("prefix_rewrite", None)), **kw)  # fmt: skip


INB = Cluster("inb")


def _node(client_route: Route, server_routes: tuple[Route, ...], inbound_cluster: Cluster = INB,
          server_filters: tuple = ()) -> RoutingTable:  # fmt: skip
    """a: an outbound listener of port 8080 with `client_route` to cluster to-b; b: an inbound chain of 8080."""
    out = Listener("0.0.0.0_8080", "oam", 8080, ListenerProtocol.HTTP, route_config="out")
    routes = RouteConfig("out", (VirtualHost("any", routes=(client_route,)),))
    a = Snapshot("xds:LDS=1", PLANES, (out,), {"out": routes}, {"to-b": Cluster("to-b")})
    inbound = Listener("virtualInbound/0.0.0.0_8080", "oam", 8080, ListenerProtocol.HTTP, route_config="in",
                       http_filters=server_filters)  # fmt: skip
    b = Snapshot("xds:LDS=1", PLANES, (inbound,), {"in": RouteConfig("in", (VirtualHost("in", routes=server_routes),))},
                 {"inb": inbound_cluster})
    snap = merge(PLANES, {"a.default": (A, a), "b.default": (B, b)}, "m").snapshot
    validate_snapshot(snap)
    return RoutingTable(snap, "oam")


def _decide(table: RoutingTable, target: bytes = b"/api/x", src: str = "198.18.1.10", endpoint=SERVER,
            headers: dict | None = None) -> tuple[RouteResult, pipeline.Local | RouteResult | None]:  # fmt: skip
    router = table.router
    crc = router.route_config(SERVER[0], SERVER[1], src)
    assert crc is not None
    hmap = headers or {}
    first = router.route_request(crc, "b.default:8080", target, lambda: hmap)
    proxy = _proxy(table)
    return first, pipeline.local_inbound(proxy, crc, endpoint, first, "b.default:8080", target,  # type: ignore[arg-type]
                                         lambda: hmap)  # fmt: skip


def _proxy(table: RoutingTable) -> SimpleNamespace:
    """What pipeline.local_inbound reads of the plane's proxy: its table (router, balancer, route limiters)."""
    return SimpleNamespace(table=table, stats=SimpleNamespace(rate_limited=0, overloaded=0), sla=SLA(),
                           clock=lambda: 0.0)  # fmt: skip


ADDS_TAG = Route(action=RouteAction(cluster="inb", timeout_s=0.0),
                 request_headers_to_add=(HeaderValue("x-inbound", "b"),),
                 response_headers_to_add=(HeaderValue("x-served-by", "b"),))  # fmt: skip
ONLY_API = Route(match=RouteMatch(prefix="/api"), action=RouteAction(cluster="inb"))


@pytest.mark.parametrize(("client", "server", "target", "src", "endpoint", "headers", "expect"), [
    # the server's inbound route adds a request and a response header: both reach the chained route
    (_client_route(), (ADDS_TAG,), b"/api/x", A.addresses[0], SERVER, None, "forward: x-inbound"),
    # a path the server's routes do not match: 404 NR, as b's sidecar answers a remote client
    (_client_route(), (ONLY_API,), b"/other", A.addresses[0], SERVER, None, 404),
    (_client_route(), (ONLY_API,), b"/api/x", A.addresses[0], SERVER, None, "forward"),
    # the client's rewrite happens first: /old/x arrives at b as /api/x
    (_client_route(match=RouteMatch(prefix="/old"), prefix_rewrite="/api"), (ONLY_API,), b"/old/x",
     A.addresses[0], SERVER, None, "forward"),
    # a header the client's route adds is one b's route matches on
    (_client_route(request_headers_to_add=(HeaderValue("x-canary", "1"),)),
     (Route(match=RouteMatch(headers=(HeaderMatch("x-canary", exact="1"),)), action=RouteAction(cluster="inb")),),
     b"/", A.addresses[0], SERVER, None, "forward"),
    (_client_route(),
     (Route(match=RouteMatch(headers=(HeaderMatch("x-canary", exact="1"),)), action=RouteAction(cluster="inb")),),
     b"/", A.addresses[0], SERVER, None, 404),
    # the server's direct response answers
    (_client_route(), (Route(action=None, direct_response=DirectResponse(418, b"teapot")),), b"/", A.addresses[0],
     SERVER, None, 418),
    (_client_route(), (Route(action=None, redirect=Redirect(host="elsewhere", code=302)),), b"/r", A.addresses[0],
     SERVER, None, 302),
    # an endpoint that is no local workload's inbound listener: no second stage
    (_client_route(), (ONLY_API,), b"/other", A.addresses[0], (REMOTE, 8080), None, None),
    # the server's inbound chain is on 8080 only: an endpoint port it does not serve has no second stage
    (_client_route(), (ONLY_API,), b"/other", A.addresses[0], ("198.18.1.11", 9090), None, None),
], ids=["route-headers", "no-route-404", "matched", "after-rewrite", "client-header-matched",
        "client-header-missing", "direct-response", "redirect", "remote-endpoint", "other-port"])  # fmt: skip
def test_local_inbound_decision(client, server, target, src, endpoint, headers, expect) -> None:
    router = _node(client, server)
    _first, step = _decide(router, target, src, endpoint, headers)
    if expect is None:
        assert step is None
    elif isinstance(expect, int):
        assert type(step) is pipeline.Local and step.status == expect, step
        if expect == 404:
            assert step.flag == "NR"
    else:
        assert isinstance(step, RouteResult) and step.forward and step.route is not None, step
        assert step.cluster is not None and step.cluster.name == "to-b"  # the client's route picked the cluster
        if expect.endswith("x-inbound"):
            assert [h.name for h in step.route.request_headers_to_add] == ["x-inbound"]
            assert [h.name for h in step.route.response_headers_to_add] == ["x-served-by"]


def test_a_remote_client_gets_the_servers_chain_alone() -> None:
    """A client that is no local workload is routed by b's inbound chain itself (route_config by destination):
    there is no second stage to apply."""
    router = _node(_client_route(), (ONLY_API,)).router
    crc = router.route_config(SERVER[0], SERVER[1], REMOTE)
    assert crc is not None and router.local_inbound(crc, *SERVER) is None
    assert router.route_request(crc, "b", b"/other", dict).route is None  # b's own 404


@pytest.mark.parametrize(("client_s", "server_s", "expect"), [
    (5.0, 2.0, 2.0), (2.0, 5.0, 2.0), (5.0, 0.0, 5.0), (0.0, 3.0, 3.0), (0.0, 0.0, 0.0),
])  # fmt: skip
def test_the_tighter_timeout_wins(client_s: float, server_s: float, expect: float) -> None:
    assert tighter_timeout(client_s, server_s) == expect
    router = _node(_client_route(timeout_s=client_s),
                   (Route(action=RouteAction(cluster="inb", timeout_s=server_s)),))  # fmt: skip
    _first, step = _decide(router, b"/")
    assert isinstance(step, RouteResult) and step.timeout_s == expect


def test_chained_routes_are_made_once_per_pair() -> None:
    router = _node(_client_route(), (ADDS_TAG,))
    _f, one = _decide(router, b"/a")
    _f, two = _decide(router, b"/b")
    _f, again = _decide(router, b"/a")
    assert isinstance(one, RouteResult) and isinstance(two, RouteResult) and one.route is two.route
    assert again is one  # the same request (its routing results cached): the same chained result


def test_chained_header_changes_equal_the_two_sidecars_in_turn() -> None:
    """Request: the client's route, then the server's; response: the server's, then the client's. A header the
    second stage removes is gone even when the first one added it; a set (append false) overrides."""
    client = Route(request_headers_to_remove=("x-drop",),
                   request_headers_to_add=(HeaderValue("x-a", "1"), HeaderValue("x-tmp", "t")),
                   response_headers_to_remove=("x-internal",),
                   response_headers_to_add=(HeaderValue("x-via", "a", append=False),))  # fmt: skip
    server = Route(request_headers_to_remove=("x-tmp",),
                   request_headers_to_add=(HeaderValue("x-a", "2", append=False), HeaderValue("x-b", "b")),
                   response_headers_to_add=(HeaderValue("x-via", "b"), HeaderValue("x-internal", "secret")))
    both = chained(client, server)
    request = [(b"x-drop", b"d"), (b"x-tmp", b"old"), (b"x-keep", b"k")]
    assert route_request_headers(both, request) == route_request_headers(server, route_request_headers(client, request))
    assert route_request_headers(both, request) == [(b"x-keep", b"k"), (b"x-a", b"2"), (b"x-b", b"b")]
    response = [(b"x-via", b"origin"), (b"content-type", b"text/plain")]
    assert response_headers(both, response) == response_headers(client, response_headers(server, response))
    assert (b"x-internal", b"secret") not in response_headers(both, response)


def test_what_the_server_matches_on() -> None:
    """The authority, target and headers as they arrive at the server's sidecar."""
    route = Route(match=RouteMatch(prefix="/old"),
                  action=RouteAction(cluster="c", prefix_rewrite="/new", host_rewrite="b.internal"),
                  request_headers_to_remove=("x-secret",),
                  request_headers_to_add=(HeaderValue("x-a", "2"), HeaderValue("x-set", "s", append=False)))
    assert seen_by_server(route, "b:80", b"/old/p?q=1") == ("b.internal", b"/new/p?q=1")
    assert seen_by_server(route, "b:80", b"/other") == ("b.internal", b"/other")
    hmap = headers_seen_by_server(route, lambda: {"x-secret": "s", "x-a": "1", "x-set": "old"})()
    assert hmap == {"x-a": "1,2", "x-set": "s"}
    plain = Route()
    getter = dict
    assert headers_seen_by_server(plain, getter) is getter  # nothing changed: the same callable


def test_the_servers_inbound_cluster_request_limit_holds() -> None:
    """The server's inbound cluster (max_requests 1) counts the local client's request as it counts a remote
    client's: a second one at the same time is refused 503 UO; the unit comes back when the first ends."""
    inb = Cluster("inb", circuit_breakers=CircuitBreakers(max_requests=1))
    table = _node(_client_route(), (Route(action=RouteAction(cluster="inb")),), inb)
    router, proxy = table.router, _proxy(table)
    crc = router.route_config(*SERVER, A.addresses[0])
    assert crc is not None
    first = router.route_request(crc, "b", b"/", dict)
    held = pipeline.local_inbound(proxy, crc, SERVER, first, "b", b"/", dict)  # type: ignore[arg-type]
    assert isinstance(held, RouteResult) and held.inbound_hold is not None
    refused = pipeline.local_inbound(proxy, crc, SERVER, first, "b", b"/", dict)  # type: ignore[arg-type]
    assert type(refused) is pipeline.Local and refused.status == 503 and refused.flag == "UO"
    assert proxy.stats.overloaded == 1
    held.inbound_hold.release(REQUESTS)  # what Attempt.release does when the request ends
    again = pipeline.local_inbound(proxy, crc, SERVER, first, "b", b"/", dict)  # type: ignore[arg-type]
    assert isinstance(again, RouteResult) and again.inbound_hold is held.inbound_hold
    again.inbound_hold.release(REQUESTS)
    # a remote client's request through the server's own chain holds the same unit (pipeline.upstream, step 4)
    remote_crc = router.route_config(*SERVER, REMOTE)
    assert remote_crc is not None
    up = pipeline.upstream(proxy, router.route_request(remote_crc, "b", b"/", dict), dict, REMOTE)  # type: ignore[arg-type]
    assert isinstance(up, pipeline.Upstream) and up.breaker is held.inbound_hold
    refused = pipeline.local_inbound(proxy, crc, SERVER, first, "b", b"/", dict)  # type: ignore[arg-type]
    assert type(refused) is pipeline.Local and refused.status == 503


def test_the_servers_inbound_route_rate_limit_holds() -> None:
    limited = Route(action=RouteAction(cluster="inb"), rate_limit=LocalRateLimit(1, 1, 3600.0))
    router = _node(_client_route(), (limited,))
    _f, ok = _decide(router, b"/")
    _f, refused = _decide(router, b"/")
    assert isinstance(ok, RouteResult)
    assert type(refused) is pipeline.Local and refused.status == 429 and refused.flag == "RL"


@pytest.mark.parametrize(("filters", "expect"), [
    ((LocalRateLimit(1, 1, 3600.0),), [200, 429]),  # the server listener's local rate limit
    ((FaultFilter(abort_status=503, abort_percent=100.0),), [503, 503]),  # its fault abort
    # its fault delay: the stage goes on after it (pipeline.Staged; before, the delay was not applied)
    ((FaultFilter(delay_s=5.0, delay_percent=100.0),), ["delay 5.0", "delay 5.0"]),
    ((FaultFilter(delay_s=2.0, delay_percent=100.0, abort_status=500, abort_percent=100.0),),
     ["delay 2.0 then 500", "delay 2.0 then 500"]),
])  # fmt: skip
def test_the_servers_listener_filters(filters: tuple, expect: list) -> None:
    table = _node(_client_route(), (Route(action=RouteAction(cluster="inb")),), server_filters=filters)
    got = []
    for _ in expect:
        _f, step = _decide(table, b"/")
        got.append(_outcome(step))
        if type(step) is pipeline.Staged:
            step = step.result
        if isinstance(step, RouteResult) and step.inbound_hold is not None:
            step.inbound_hold.release(REQUESTS)
    assert got == expect


def _outcome(step) -> object:
    if type(step) is pipeline.Local:
        return step.status
    if type(step) is pipeline.Staged:
        then = f" then {step.delay.abort_status}" if step.delay.abort_status is not None else ""
        return f"delay {step.delay.delay_s}{then}"
    return 200 if isinstance(step, RouteResult) else None


@pytest.mark.parametrize(("fault", "expect"), [
    (FaultFilter(abort_status=503, abort_percent=100.0), 503),
    (FaultFilter(delay_s=1.5, delay_percent=100.0), "delay 1.5"),
    (FaultFilter(delay_s=1.0, delay_percent=100.0, abort_status=429, abort_percent=100.0), "delay 1.0 then 429"),
    (FaultFilter(abort_status=503, abort_percent=0.0), 200),
])  # fmt: skip
def test_the_servers_route_fault(fault: FaultFilter, expect: object) -> None:
    """The server's inbound route's own fault (typed_per_filter_config, a VirtualService fault on its inbound
    route) applies to a same-node client; before, only its listener's fault aborts did."""
    table = _node(_client_route(), (Route(action=RouteAction(cluster="inb"), fault=fault),))
    _f, step = _decide(table, b"/")
    assert _outcome(step) == expect


def test_a_listener_delay_takes_the_place_of_the_route_fault() -> None:
    """As in the client's own stage (and Envoy's fault filter with a per-route config): one fault decision."""
    table = _node(_client_route(), (Route(action=RouteAction(cluster="inb"), fault=FaultFilter(abort_status=503)),),
                  server_filters=(FaultFilter(delay_s=0.5, delay_percent=100.0),))  # fmt: skip
    _f, step = _decide(table, b"/")
    assert _outcome(step) == "delay 0.5"


def _rewritten(client: Route, server: Route, target: bytes) -> bytes:
    """What the server's pod receives: the client's rewrite then the server's (two sidecars, one each)."""
    return prefix_rewritten(chained(client, server), target)


@pytest.mark.parametrize(("client", "server", "target", "expect"), [
    # the server's rewrite alone (before: not applied, the pod got /api/x)
    (None, ("/api", "/v1"), b"/api/x", b"/v1/x"),
    # the client's alone, as before
    (("/old", "/api"), None, b"/old/x", b"/api/x"),
    # both: /old/x -> /api/x (client) -> /v1/x (server)
    (("/old", "/api"), ("/api", "/v1"), b"/old/x", b"/v1/x"),
    # the server's prefix longer than the client's replacement: /o/ab -> /a/ab... -> /z/b
    (("/o", "/a"), ("/a/a", "/z/"), b"/o/ab", b"/z/b"),
    # the server's prefix inside the client's replacement: /o/x -> /svc/v2/x -> /pod/v2/x
    (("/o", "/svc/v2"), ("/svc", "/pod"), b"/o/x", b"/pod/v2/x"),
    # a client rewrite to "/" and a server rewrite of "/"
    (("/old/", "/"), ("/", "/base/"), b"/old/x", b"/base/x"),
])  # fmt: skip
def test_both_prefix_rewrites_compose(client, server, target: bytes, expect: bytes) -> None:
    c = Route(match=RouteMatch(prefix=client[0]), action=RouteAction(cluster="to-b", prefix_rewrite=client[1])) \
        if client else Route(action=RouteAction(cluster="to-b"))
    s = Route(match=RouteMatch(prefix=server[0]), action=RouteAction(cluster="inb", prefix_rewrite=server[1])) \
        if server else Route(action=RouteAction(cluster="inb"))
    step_by_step = prefix_rewritten(s, prefix_rewritten(c, target))
    assert _rewritten(c, s, target) == expect == step_by_step


def test_the_servers_host_rewrite_wins() -> None:
    c = Route(action=RouteAction(cluster="to-b", host_rewrite="client.example"))
    s = Route(action=RouteAction(cluster="inb", host_rewrite="server.local"))
    assert chained(c, s).action.host_rewrite == "server.local"  # type: ignore[union-attr]
    assert chained(c, Route(action=RouteAction(cluster="inb"))).action.host_rewrite == "client.example"  # type: ignore[union-attr]


def test_the_server_stage_carries_its_retry_policy() -> None:
    retry = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=2)
    table = _node(_client_route(), (Route(action=RouteAction(cluster="inb", retry=retry)),))
    _f, step = _decide(table, b"/")
    assert isinstance(step, RouteResult) and step.inbound_retry == retry


def test_the_client_pods_principal_comes_from_the_pod_table() -> None:
    """a's outbound listener carries a's SPIFFE ID (merge); the router gives it for a's own address on a's
    listener only: never for another address, never on a listener that is no local client's."""
    table = _node(_client_route(), (ADDS_TAG,))
    router = table.router
    crc = router.route_config(SERVER[0], SERVER[1], A.addresses[0])
    assert crc is not None and crc.local_client
    assert router.principal_of(crc, A.addresses[0]) == "spiffe://cluster.local/ns/default/sa/default"
    assert router.principal_of(crc, "::ffff:" + A.addresses[0]) == "spiffe://cluster.local/ns/default/sa/default"
    assert router.principal_of(crc, REMOTE) is None
    assert router.principal_of(crc, "not an address") is None
    inbound = router.route_config(SERVER[0], SERVER[1], REMOTE)  # a remote client: b's inbound chain
    assert inbound is not None and not inbound.local_client
    assert router.principal_of(inbound, A.addresses[0]) is None


def test_the_principal_uses_the_trust_domain_and_refuses_bad_names() -> None:
    assert principal(Workload("p", "prod", ("198.18.1.12",), service_account="api"), "corp.example") == \
        "spiffe://corp.example/ns/prod/sa/api"
    assert principal(Workload("p", "prod", ("198.18.1.12",), service_account="a/sa/admin"), "td") == ""


def test_the_pod_tables_trust_domain_comes_from_the_bootstrap() -> None:
    base = {"node": {"id": "n", "metadata": {"NAMESPACE": "planemesh-system", "SERVICE_ACCOUNT": "planemesh"}},
            "server": {"address": "127.0.0.1:15010"}, "planes": yaml.safe_load(default_config_text())["planes"]}
    assert trust_domain(bootstrap_from_dict(base)) == "cluster.local"
    assert trust_domain(bootstrap_from_dict({**base, "ca": {"trust_domain": "corp.example"}})) == "corp.example"


@pytest.mark.parametrize(("mode", "details", "by", "client", "expect"), [
    ("append_forward", ("subject", "uri", "dns"), "spiffe://td/ns/b/sa/b", "spiffe://td/ns/a/sa/a",
     b'By=spiffe://td/ns/b/sa/b;Subject="";URI=spiffe://td/ns/a/sa/a'),
    ("sanitize_set", ("uri",), None, "spiffe://td/ns/a/sa/a", b"URI=spiffe://td/ns/a/sa/a"),
    ("sanitize", ("uri",), "spiffe://td/ns/b/sa/b", "spiffe://td/ns/a/sa/a", None),
    ("forward_only", ("uri",), "spiffe://td/ns/b/sa/b", "spiffe://td/ns/a/sa/a", None),
    ("append_forward", ("uri",), "spiffe://td/ns/b/sa/b", None, None),  # no identity: no header
    ("append_forward", (), None, "spiffe://td/ns/a/sa/a", None),
])  # fmt: skip
def test_the_xfcc_a_server_stage_sets(mode: str, details: tuple, by, client, expect) -> None:
    assert xfcc_element(mode, details, by, client) == expect


def test_the_pod_table_keeps_host_addresses_only() -> None:
    table = PodTable()
    table.add(Listener("out~a", "oam", 8080, ListenerProtocol.HTTP, sources=(IPNetwork("198.18.1.10/32"),),
                       workload_principal="spiffe://td/ns/n/sa/a"))  # fmt: skip
    table.add(Listener("in~b", "oam", 8080, ListenerProtocol.HTTP, prefixes=(IPNetwork("fd00:18:1::11/128"),),
                       workload_principal="spiffe://td/ns/n/sa/b"))  # fmt: skip
    table.add(Listener("wide", "oam", 8080, ListenerProtocol.HTTP, prefixes=(IPNetwork("198.18.1.0/24"),),
                       workload_principal="spiffe://td/ns/n/sa/wide"))  # a prefix is no pod's address  # fmt: skip
    assert table.principal("198.18.1.10") == "spiffe://td/ns/n/sa/a"
    assert table.principal("::ffff:198.18.1.10") == "spiffe://td/ns/n/sa/a"
    assert table.principal("fd00:18:1:0::11") == "spiffe://td/ns/n/sa/b"
    assert table.principal("198.18.1.12") is None and table.principal("bad") is None
    assert not PodTable() and table
