"""Upgrades, CONNECT and trailers without I/O: which upgrades a route allows (Envoy's table), CONNECT routing,
CONNECT targets, the last chunk with trailers, and the xDS translation of upgrade_configs / connect_matcher."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from planemesh.agent.proxy.http1 import last_chunk, parse_authority
from planemesh.agent.proxy.routing import CompiledRouteConfig, PlaneRouter
from planemesh.model.config import (
    DEFAULT_UPGRADES,
    ConfigError,
    Listener,
    ListenerProtocol,
    Route,
    RouteAction,
    RouteConfig,
    RouteMatch,
    Snapshot,
    UpgradeConfig,
    VirtualHost,
)
from planemesh.xds.translate import translate
from tests.unit.test_xds_translate import PLANES, http_listener, to_resources

ON, OFF = True, False


@pytest.mark.parametrize(
    ("listener", "route", "allowed"),
    [
        ((UpgradeConfig("websocket", ON),), (), True),  # HCM on, route silent
        ((UpgradeConfig("websocket", ON),), (UpgradeConfig("websocket", OFF),), False),  # route turns it off
        ((UpgradeConfig("websocket", OFF),), (UpgradeConfig("websocket", ON),), True),  # route turns it on
        ((UpgradeConfig("websocket", OFF),), (), False),
        ((), (), False),  # not configured anywhere (Envoy's HCM default)
        ((), (UpgradeConfig("websocket", ON),), True),  # configured on the route only
        ((UpgradeConfig("connect", ON),), (), False),  # another type does not count
    ],
)
def test_upgrade_allowed_follows_envoys_table(listener, route, allowed) -> None:
    crc = CompiledRouteConfig(RouteConfig("rc"), (), listener)
    assert crc.upgrade_allowed(Route(action=RouteAction(upgrades=route)), "websocket") is allowed


def test_default_upgrades_are_websocket_only() -> None:
    crc = CompiledRouteConfig(RouteConfig("rc"))
    assert crc.upgrade_allowed(None, "websocket") and not crc.upgrade_allowed(None, "connect")
    assert Listener("l", "oam", 80, ListenerProtocol.HTTP).upgrades == DEFAULT_UPGRADES


def test_connect_requests_match_only_connect_routes() -> None:
    connect_route = Route(match=RouteMatch(prefix=None, connect=True), action=RouteAction(cluster="c"), name="tun")
    catch_all = Route(action=RouteAction(cluster="c"), name="all")
    vhosts = (
        VirtualHost("db", domains=("db.example:5432",), routes=(connect_route,)),
        VirtualHost("any", routes=(catch_all, connect_route)),
    )
    snap = Snapshot(
        version="1", planes=PLANES,
        listeners=(Listener("l", "oam", 80, ListenerProtocol.HTTP, route_config="rc"),),
        routes=MappingProxyType({"rc": RouteConfig("rc", vhosts)}),
    )  # fmt: skip
    router = PlaneRouter(snap, "oam")
    crc = router.route_config("198.18.1.9", 80)
    assert crc is not None
    route_of = lambda target, connect: router.route_request(crc, "any", target, dict, connect).route  # noqa: E731
    assert route_of(b"10.0.0.1:443", True).name == "tun"  # the catch-all prefix route never sees CONNECT
    assert route_of(b"/x", False).name == "all"
    assert route_of(b"db.example:5432", True).name == "tun"  # the virtual host is picked by the target
    db = crc.virtual_host("db.example:5432")
    assert db is not None and db.select("/x", "", dict) is None  # nor does a connect route match a GET


@pytest.mark.parametrize(
    ("target", "parsed"),
    [
        (b"198.18.1.2:9000", ("198.18.1.2", 9000)),
        (b"[fd00:18:1::2]:443", ("fd00:18:1::2", 443)),
        (b"Db.Example:5432", ("db.example", 5432)),
        (b"host", None),
        (b"host:0", None),
        (b"host:65536", None),
        (b"host:+1", None),
        (b"/path", None),
        (b"fd00::1:80", None),  # an IPv6 literal needs brackets
        (b"[zz::1]:80", None),
        (b"a b:80", None),
    ],
)
def test_connect_target(target: bytes, parsed) -> None:
    assert parse_authority(target) == parsed


def test_last_chunk_carries_trailers_minus_framing_and_routing_fields() -> None:
    assert last_chunk(None) == b"0\r\n\r\n"
    trailers = [(b"grpc-status", b"0"), (b"content-length", b"9"), (b"host", b"x"), (b"connection", b"close")]
    assert last_chunk(trailers) == b"0\r\ngrpc-status: 0\r\n\r\n"


CLUSTER = {
    "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "name": "pass",
    "type": "ORIGINAL_DST",
    "lb_policy": "CLUSTER_PROVIDED",
    "connect_timeout": "1s",
}


def routes(*route_list: dict) -> dict:
    return {"name": "r", "virtual_hosts": [{"name": "any", "domains": ["*"], "routes": list(route_list)}]}


def test_translate_upgrade_configs() -> None:
    rc = routes(
        {"match": {"connect_matcher": {}},
         "route": {"cluster": "pass", "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}},
        {"match": {"prefix": "/"}, "route": {"cluster": "pass", "upgrade_configs": [
            {"upgrade_type": "websocket", "enabled": False}]}},
    )  # fmt: skip
    hcm_upgrades = [{"upgrade_type": "WebSocket"}, {"upgrade_type": "spdy/3.1", "enabled": False}]
    snap = translate(to_resources([http_listener(route_config=rc, upgrade_configs=hcm_upgrades), CLUSTER]), PLANES)
    assert snap.listeners[0].upgrades == (UpgradeConfig("websocket"), UpgradeConfig("spdy/3.1", False))
    connect, plain = snap.routes["r"].virtual_hosts[0].routes
    assert connect.match.connect and connect.action.upgrades == (UpgradeConfig("connect"),)
    assert not plain.match.connect and plain.action.upgrades == (UpgradeConfig("websocket", False),)
    # An HCM without upgrade_configs refuses every upgrade, as Envoy's.
    assert translate(to_resources([http_listener(), CLUSTER]), PLANES).listeners[0].upgrades == ()


@pytest.mark.parametrize(
    ("hcm_upgrades", "route", "error"),
    [
        ([{"upgrade_type": "h2c"}], None, "upgrade_configs[0].upgrade_type: h2c upgrades are not tunneled"),
        ([{"upgrade_type": "web socket"}], None, "is not an upgrade protocol name"),
        ([{"upgrade_type": "websocket", "filters": [{"name": "x"}]}], None, "[0].filters: not supported"),
        ([{"upgrade_type": "websocket"}, {"upgrade_type": "WEBSOCKET"}], None, "is configured twice"),
        ([], {"match": {"connect_matcher": {}}, "route": {"cluster": "pass"}}, "planemesh terminates CONNECT"),
        ([], {"match": {"prefix": "/"}, "route": {"cluster": "pass", "upgrade_configs": [
            {"upgrade_type": "websocket", "connect_config": {}}]}}, "connect_config: only for upgrade_type CONNECT"),
        ([], {"match": {"connect_matcher": {}}, "route": {"cluster": "pass", "upgrade_configs": [
            {"upgrade_type": "CONNECT", "connect_config": {"allow_post": True}}]}}, "connect_config.allow_post"),
    ],
)  # fmt: skip
def test_translate_refuses_what_planemesh_cannot_do(hcm_upgrades, route, error: str) -> None:
    listener = http_listener(route_config=routes(route) if route else None, upgrade_configs=hcm_upgrades)
    with pytest.raises(ConfigError) as err:
        translate(to_resources([listener, CLUSTER]), PLANES)
    assert error in str(err.value)
