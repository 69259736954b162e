"""Route matching tables: virtual hosts by authority, routes by path/regex/headers/query, listeners by port."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from planemesh.agent.proxy.balancer import Balancer, normalise_ip
from planemesh.agent.proxy.routing import (
    CompiledRouteConfig,
    CompiledVirtualHost,
    PlaneRouter,
    parse_query,
    redirect_location,
    split_target,
)
from planemesh.model.config import (
    Cluster,
    ClusterKind,
    DirectResponse,
    Endpoint,
    HeaderMatch,
    Listener,
    ListenerProtocol,
    QueryMatch,
    Redirect,
    Route,
    RouteAction,
    RouteConfig,
    RouteMatch,
    Snapshot,
    VirtualHost,
    WeightedCluster,
)
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import Plane

VHOSTS = RouteConfig(name="rc", virtual_hosts=(
    VirtualHost(name="exact", domains=("api.example.com", "api.example.com:8080")),
    VirtualHost(name="suffix-long", domains=("*.svc.example.com",)),
    VirtualHost(name="suffix", domains=("*.example.com",)),
    VirtualHost(name="prefix", domains=("media.*",)),
    VirtualHost(name="default", domains=("*",)),
))


@pytest.mark.parametrize(("authority", "expected"), [
    ("api.example.com", "exact"),
    ("API.Example.COM", "exact"),
    ("api.example.com:8080", "exact"),
    ("api.example.com:9999", "exact"),  # port stripped on the second try
    ("a.svc.example.com", "suffix-long"),
    ("www.example.com", "suffix"),
    ("example.com", "default"),  # "*.example.com" needs something before the suffix
    ("media.node1", "prefix"),
    ("media.node1:80", "prefix"),
    ("10.0.0.1:80", "default"),
    ("[fd00::1]:80", "default"),
    ("", "default"),
])
def test_virtual_host_selection(authority: str, expected: str) -> None:
    vh = CompiledRouteConfig(VHOSTS).virtual_host(authority)
    assert vh is not None and vh.name == expected


def test_no_default_virtual_host_means_no_match() -> None:
    rc = RouteConfig(name="rc", virtual_hosts=(VirtualHost(name="only", domains=("a.b",)),))
    assert CompiledRouteConfig(rc).virtual_host("c.d") is None


ROUTES = VirtualHost(name="vh", routes=(
    Route(name="exact", match=RouteMatch(prefix=None, path="/exact")),
    Route(name="regex", match=RouteMatch(prefix=None, regex=r"/items/\d+")),
    Route(name="hdr-exact", match=RouteMatch(prefix="/h", headers=(HeaderMatch(name="x-env", exact="canary"),))),
    Route(name="hdr-prefix", match=RouteMatch(prefix="/h", headers=(HeaderMatch(name="x-env", prefix="stag"),))),
    Route(name="hdr-regex", match=RouteMatch(prefix="/h", headers=(HeaderMatch(name="x-env", regex="v[0-9]+"),))),
    Route(name="hdr-absent", match=RouteMatch(prefix="/h", headers=(HeaderMatch(name="x-env", present=False),))),
    Route(name="hdr-invert",
          match=RouteMatch(prefix="/h", headers=(HeaderMatch(name="x-env", exact="x", invert=True),))),
    Route(name="query", match=RouteMatch(prefix="/q", query=(QueryMatch(name="debug", exact="1"),))),
    Route(name="query-re", match=RouteMatch(prefix="/q", query=(QueryMatch(name="id", regex="[a-f]+"),))),
    Route(name="query-present", match=RouteMatch(prefix="/q", query=(QueryMatch(name="p", present=True),))),
    Route(name="api", match=RouteMatch(prefix="/api/")),
    Route(name="root", match=RouteMatch(prefix="/")),
))


@pytest.mark.parametrize(("path", "query", "headers", "expected"), [
    ("/exact", "", {}, "exact"),
    ("/exact/more", "", {}, "root"),  # path is exact, not a prefix
    ("/items/42", "", {}, "regex"),
    ("/items/42x", "", {}, "root"),  # safe regex is a full match
    ("/h", "", {"x-env": "canary"}, "hdr-exact"),
    ("/h", "", {"x-env": "staging"}, "hdr-prefix"),
    ("/h", "", {"x-env": "v12"}, "hdr-regex"),
    ("/h", "", {}, "hdr-absent"),
    ("/h", "", {"x-env": "other"}, "hdr-invert"),
    ("/h", "", {"x-env": "x"}, "root"),
    ("/q", "a=b&debug=1", {}, "query"),
    ("/q", "debug=2&id=beef", {}, "query-re"),
    ("/q", "id=xyz&p", {}, "query-present"),
    ("/q", "", {}, "root"),
    ("/api/v1", "", {}, "api"),
    ("/API/v1", "", {}, "root"),  # case-sensitive, as Envoy
    ("/", "", {}, "root"),
])
def test_route_selection(path: str, query: str, headers: dict[str, str], expected: str) -> None:
    route = CompiledVirtualHost(ROUTES).select(path, query, lambda: headers)
    assert route is not None and route.name == expected


def test_headers_are_only_built_when_a_route_needs_them() -> None:
    calls = []
    vh = CompiledVirtualHost(VirtualHost(name="vh", routes=(Route(name="a", match=RouteMatch(prefix="/")),)))
    assert vh.select("/x", "", lambda: calls.append(1) or {}) is not None
    assert calls == []


@pytest.mark.parametrize(("target", "expected"), [
    ("/a/b?x=1&y", ("/a/b", "x=1&y")),
    ("/", ("/", "")),
    ("http://host:8080/p?q", ("/p", "q")),
    ("http://host", ("/", "")),
    ("*", ("*", "")),
])
def test_split_target(target: str, expected: tuple[str, str]) -> None:
    assert split_target(target) == expected


def test_parse_query_keeps_first_value() -> None:
    assert parse_query("a=1&a=2&b&=z&&c=") == {"a": "1", "b": "", "": "z", "c": ""}


@pytest.mark.parametrize(("redirect", "expected"), [
    (Redirect(host="new.example"), "http://new.example/p?q=1"),
    (Redirect(path="/other"), "http://old:80/other"),
    (Redirect(scheme="https"), "https://old:80/p?q=1"),
])
def test_redirect_location(redirect: Redirect, expected: str) -> None:
    assert redirect_location(redirect, "http", "old:80", "/p", "q=1") == expected


def _snapshot() -> Snapshot:
    plane = Plane(name="oam", plane_id=1, interfaces=("eth*",), cidrs=(IPNetwork("198.18.1.0/24"),))
    rc_a = RouteConfig(name="a", virtual_hosts=(VirtualHost(name="a", routes=(
        Route(name="direct", match=RouteMatch(prefix="/direct"), action=None,
              direct_response=DirectResponse(status=418, body=b"tea")),
        Route(name="redir", match=RouteMatch(prefix="/old"), action=None, redirect=Redirect(path="/new")),
        Route(name="weighted", match=RouteMatch(prefix="/w"), action=RouteAction(
            weighted=(WeightedCluster("c1", 3), WeightedCluster("c2", 1)))),
        Route(name="c1", action=RouteAction(cluster="c1")),
    )),))
    rc_b = RouteConfig(name="b", virtual_hosts=(VirtualHost(name="b", domains=("b.example",)),))
    return Snapshot(
        version="1", planes=(plane,),
        listeners=(
            Listener(name="l80", plane="oam", port=80, protocol=ListenerProtocol.HTTP, route_config="a"),
            Listener(name="l8080-narrow", plane="oam", port=8080, protocol=ListenerProtocol.HTTP,
                     prefixes=(IPNetwork("198.18.1.128/25"),), route_config="b"),
            Listener(name="l8080", plane="oam", port=8080, protocol=ListenerProtocol.HTTP, route_config="a"),
            Listener(name="l9000", plane="oam", port=9000, protocol=ListenerProtocol.TCP),
            Listener(name="l81", plane="oam", port=81, protocol=ListenerProtocol.HTTP),
        ),
        routes=MappingProxyType({"a": rc_a, "b": rc_b}),
        clusters=MappingProxyType({
            "c1": Cluster(name="c1", kind=ClusterKind.STATIC,
                          endpoints=(Endpoint("198.18.1.10", 80), Endpoint("198.18.1.11", 80),
                                     Endpoint("198.18.1.12", 80, healthy=False))),
            "c2": Cluster(name="c2", kind=ClusterKind.ORIGINAL_DST),
        }),
    )


@pytest.mark.parametrize(("dst", "port", "expected"), [
    ("198.18.1.5", 80, "a"),
    ("::ffff:198.18.1.200", 8080, "b"),  # the narrower prefix wins; v4-mapped counts as v4
    ("198.18.1.5", 8080, "a"),
    ("198.18.1.5", 81, "planemesh.original_destination"),  # HTTP listener without route config
    ("198.18.1.5", 9000, None),  # TCP listener: never routed by the L7 proxy
    ("198.18.1.5", 1234, None),  # undeclared
])
def test_listener_route_config(dst: str, port: int, expected: str | None) -> None:
    crc = PlaneRouter(_snapshot(), "oam").route_config(dst, port)
    assert (crc.name if crc else None) == expected


def test_route_results_and_balancing() -> None:
    snap = _snapshot()
    router = PlaneRouter(snap, "oam")
    crc = router.route_config("198.18.1.5", 80)
    assert crc is not None
    no_headers = dict
    direct = router.route(crc, "x", "/direct", "", no_headers)
    assert direct.direct is not None and direct.direct.status == 418 and not direct.forward
    redirect = router.route(crc, "x", "/old", "", no_headers)
    assert redirect.redirect is not None and redirect.redirect.path == "/new"
    fwd = router.route(crc, "x", "/anything", "", no_headers)
    assert fwd.forward and fwd.cluster is not None and fwd.cluster.name == "c1"
    balancer = Balancer(snap)
    picks = [balancer.pick(fwd.cluster, ("198.18.1.5", 80)) for _ in range(4)]
    assert picks == [("198.18.1.10", 80), ("198.18.1.11", 80)] * 2  # the unhealthy endpoint is skipped
    weighted = router.route(crc, "x", "/w", "", no_headers)
    assert weighted.route is not None and weighted.route.action is not None
    names = [balancer.cluster_for(weighted.route.action).name for _ in range(8)]  # type: ignore[union-attr]
    assert names.count("c1") == 6 and names.count("c2") == 2
    c2 = snap.clusters["c2"]
    assert balancer.pick(c2, ("::ffff:198.18.1.7", 8080)) == ("198.18.1.7", 8080)  # ORIGINAL_DST


def test_original_destination_route_config_forwards() -> None:
    router = PlaneRouter(_snapshot(), "oam")
    result = router.route(router.original_destination, "any", "/x", "", dict)
    assert result.forward and result.cluster is None


@pytest.mark.parametrize(("address", "expected"), [
    ("::ffff:10.1.2.3", "10.1.2.3"), ("fd00::1", "fd00::1"), ("10.0.0.1", "10.0.0.1"), ("::ffff:abcd", "::ffff:abcd"),
])
def test_normalise_ip(address: str, expected: str) -> None:
    assert normalise_ip(address) == expected
