"""Snapshot -> data-path policy: table-driven, no kernel."""

from __future__ import annotations

import pytest

from planemesh.ebpf.abi import Action
from planemesh.ebpf.policy import PlaneSettings, PolicyRule, interface_planes, policy_from_snapshot
from planemesh.model.config import ConfigError, Listener, ListenerProtocol, Snapshot
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import SLA, Plane, UndeclaredPorts
from planemesh.model.static_config import load_default_config

OAM = Plane("oam", 1, ("*-oam",), (IPNetwork("198.18.1.0/24"),))
MEDIA = Plane(
    "media", 2, ("*-media",), (IPNetwork("198.18.2.0/24"),), undeclared=UndeclaredPorts.SNIFF,
    proxy_port=15011, sniff_port=15012, sla=SLA(fail_closed=True),
)


def snap(*listeners: Listener) -> Snapshot:
    return Snapshot(version="t", planes=(MEDIA, OAM), listeners=listeners)


def http(plane: str, port: int, *prefixes: str, name: str = "") -> Listener:
    nets = tuple(IPNetwork(p) for p in prefixes)
    return Listener(name or f"{plane}-{port}", plane, port, ListenerProtocol.HTTP, nets)


def tcp(plane: str, port: int, *prefixes: str, name: str = "") -> Listener:
    nets = tuple(IPNetwork(p) for p in prefixes)
    return Listener(name or f"{plane}-{port}-tcp", plane, port, ListenerProtocol.TCP, nets)


@pytest.mark.parametrize(
    ("listeners", "rules"),
    [
        ((), {}),
        ((http("oam", 80),), {PolicyRule(1, 80): Action.PROXY}),
        ((tcp("media", 9000),), {PolicyRule(2, 9000): Action.BYPASS}),
        (
            (http("oam", 8080), tcp("oam", 8080, "198.18.9.0/24", "fd00:18:9::/64")),
            {
                PolicyRule(1, 8080): Action.PROXY,
                PolicyRule(1, 8080, "198.18.9.0/24"): Action.BYPASS,
                PolicyRule(1, 8080, "fd00:18:9::/64"): Action.BYPASS,
            },
        ),
        ((http("oam", 80, "198.18.9.7/24"),), {PolicyRule(1, 80, "198.18.9.0/24"): Action.PROXY}),  # canonical
        ((http("oam", 80), http("media", 80)), {PolicyRule(1, 80): Action.PROXY, PolicyRule(2, 80): Action.PROXY}),
    ],
)
def test_rules(listeners: tuple[Listener, ...], rules: dict) -> None:
    assert dict(policy_from_snapshot(snap(*listeners)).rules) == rules


def test_plane_settings_sorted_by_id() -> None:
    assert policy_from_snapshot(snap()).planes == (
        PlaneSettings(1, 15001, 15002, Action.BYPASS, False),
        PlaneSettings(2, 15011, 15012, Action.SNIFF, True),
    )


@pytest.mark.parametrize(
    ("listeners", "path"),
    [
        ((http("oam", 80), tcp("oam", 80)), "listeners[1]"),
        ((http("oam", 80, "198.18.9.0/24"), tcp("oam", 80, "198.18.9.0/24")), "listeners[1]"),
        ((http("nope", 80),), "listeners[0].plane"),
        ((http("oam", 0),), "listeners[0]"),
    ],
)
def test_contradictions_name_the_listener(listeners: tuple[Listener, ...], path: str) -> None:
    with pytest.raises(ConfigError) as err:
        policy_from_snapshot(snap(*listeners))
    assert err.value.path == path


def test_same_rule_twice_with_the_same_action_is_fine() -> None:
    rules = policy_from_snapshot(snap(http("oam", 80, name="a"), http("oam", 80, name="b"))).rules
    assert dict(rules) == {PolicyRule(1, 80): Action.PROXY}


def test_default_config_translates() -> None:
    policy = policy_from_snapshot(load_default_config())
    assert policy.rules[PolicyRule(1, 80)] is Action.PROXY
    assert policy.rules[PolicyRule(2, 9000)] is Action.BYPASS
    assert [p.plane_id for p in policy.planes] == [1, 2]


def test_interface_planes() -> None:
    links = {1: "lo", 5: "client-oam", 6: "client-media", 7: "eth0"}
    assert interface_planes(snap(), links) == {5: 1, 6: 2}


@pytest.mark.parametrize(("plane", "port", "prefix"), [(0, 80, None), (64, 80, None), (1, 0, None), (1, 80, "x")])
def test_policy_rule_validates(plane: int, port: int, prefix: str | None) -> None:
    with pytest.raises(ValueError):
        PolicyRule(plane, port, prefix)
