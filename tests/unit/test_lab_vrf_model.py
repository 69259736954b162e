"""Lab files describing VRF-like nodes: per-plane tables, a router pod, default routes, node sysctls."""

from __future__ import annotations

import copy

import pytest

from planemesh.labs.model import lab_from_dict, spec_to_dict
from planemesh.model.config import ConfigError

GOOD = {
    "name": "vrf",
    "node": {"default_via": {"pod": "router", "plane": "oam"}, "sysctls": {"net.ipv4.conf.all.accept_local": 1}},
    "planes": [
        {"name": "oam", "ipv4": "198.18.1.0/24", "table": 101},
        {"name": "sig", "ipv6": "fd00:18:2::/64", "table": 102},
    ],
    "pods": [
        {"name": "client", "planes": ["sig"], "gateway": "sig"},
        {"name": "router", "planes": ["oam", "sig"], "forwarding": True},
    ],
}


def test_fields_load_and_roundtrip() -> None:
    spec = lab_from_dict(GOOD)
    assert [p.table for p in spec.planes] == [101, 102]
    assert spec.pod("router").forwarding and not spec.pod("client").forwarding
    assert spec.pod("client").gateway == "sig"
    assert spec.node_default_via == ("router", "oam")
    assert spec.node_sysctls == (("net.ipv4.conf.all.accept_local", "1"),)
    assert lab_from_dict(spec_to_dict(spec)) == spec


def test_plain_labs_have_none_of_it() -> None:
    raw = {"name": "p", "planes": [{"name": "oam", "ipv4": "198.18.1.0/24"}], "pods": [{"name": "a", "planes": []}]}
    spec = lab_from_dict(raw)
    assert spec.planes[0].table is None and spec.node_default_via is None and spec.node_sysctls == ()
    assert spec_to_dict(spec) == {"name": "p", "planes": raw["planes"], "pods": raw["pods"]}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["planes"][1].update(table=101), "planes[1].table"),
        (lambda d: d["planes"][0].update(table=254), "planes[0].table"),
        (lambda d: d["planes"][0].update(table="x"), "planes[0].table"),
        (lambda d: d["planes"][0].update(vrf=1), "planes[0].vrf"),
        (lambda d: d["pods"][0].update(gateway="oam"), "pods[0].gateway"),
        (lambda d: d["pods"][1].update(forwarding="yes"), "pods[1].forwarding"),
        (lambda d: d["node"]["default_via"].update(pod="nobody"), "node.default_via.pod"),
        (lambda d: d["node"].update(default_via={"pod": "client", "plane": "oam"}), "node.default_via.plane"),
        (lambda d: d["node"].update(sysctls={"kernel.panic": 1}), "node.sysctls.kernel.panic"),
        (lambda d: d["node"].update(sysctls={"net.ipv4.ip_forward": True}), "node.sysctls.net.ipv4.ip_forward"),
        (lambda d: d["node"].update(extra=1), "node.extra"),
    ],
)
def test_bad_fields_are_named(mutate, field: str) -> None:
    raw = copy.deepcopy(GOOD)
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        lab_from_dict(raw)
    assert err.value.path == field
