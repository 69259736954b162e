"""Plane fields beyond the basics: routing table, cross-plane permission, and claims no two planes may share."""

from __future__ import annotations

import copy

import pytest
import yaml

from planemesh.model.config import ConfigError
from planemesh.model.planes import LOCAL_DELIVERY_TABLE
from planemesh.model.static_config import default_config_text, snapshot_from_dict
from planemesh.xds.bootstrap import bootstrap_from_dict

GOOD = yaml.safe_load(default_config_text())  # planes oam (id 1) and media (id 2)


def _with(mutate) -> dict:
    raw = copy.deepcopy(GOOD)
    mutate(raw)
    return raw


def test_table_and_forward_to_load() -> None:
    raw = _with(lambda d: (d["planes"][0].update(table=101, forward_to=["media"]), d["planes"][1].update(table=102)))
    snap = snapshot_from_dict(raw)
    assert (snap.plane("oam").table, snap.plane("oam").forward_to) == (101, ("media",))
    assert (snap.plane("media").table, snap.plane("media").forward_to) == (102, ())


def test_defaults_are_main_table_and_no_cross_plane() -> None:
    snap = snapshot_from_dict(GOOD)
    assert all(p.table is None and p.forward_to == () for p in snap.planes)


def test_bootstrap_planes_carry_the_new_fields() -> None:
    planes = copy.deepcopy(GOOD["planes"])
    planes[1].update(table=7, forward_to=["oam"])
    boot = bootstrap_from_dict({"node": {"id": "n1"}, "server": {"address": "127.0.0.1:18000"}, "planes": planes})
    assert (boot.planes[1].table, boot.planes[1].forward_to) == (7, ("oam",))


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda d: d["planes"][0].update(table=0), "planes[0].table", "not a private routing table"),
        (lambda d: d["planes"][0].update(table=254), "planes[0].table", "not a private routing table"),
        (lambda d: d["planes"][0].update(table=253), "planes[0].table", "not a private routing table"),
        (lambda d: d["planes"][0].update(table=255), "planes[0].table", "not a private routing table"),
        (lambda d: d["planes"][0].update(table=2**32 - 1), "planes[0].table", "not a private routing table"),
        (lambda d: d["planes"][0].update(table=-5), "planes[0].table", "not a private routing table"),
        (lambda d: d["planes"][0].update(table=LOCAL_DELIVERY_TABLE), "planes[0].table", "local-delivery"),
        (lambda d: d["planes"][0].update(table="main"), "planes[0].table", "routing table number"),
        (lambda d: d["planes"][0].update(table=True), "planes[0].table", "routing table number"),
        (
            lambda d: (d["planes"][0].update(table=100), d["planes"][1].update(table=100)),
            "planes[1].table",
            "already the table of plane 'oam'",
        ),
        (lambda d: d["planes"][0].update(forward_to=["sig"]), "planes[0].forward_to[0]", "unknown plane 'sig'"),
        (lambda d: d["planes"][0].update(forward_to=["oam"]), "planes[0].forward_to[0]", "its own addresses"),
        (lambda d: d["planes"][0].update(forward_to="media"), "planes[0].forward_to", "a list of plane names"),
        (lambda d: d["planes"][0].update(forward_to=[3]), "planes[0].forward_to[0]", "a plane name"),
        # An interface named literally by one plane and matched by another plane's pattern.
        (lambda d: d["planes"][1].update(interfaces=["client-oam"]), "planes[1].interfaces[0]", "same interface"),
        (
            lambda d: (d["planes"][0].update(interfaces=["eth1"]), d["planes"][1].update(interfaces=["eth*"])),
            "planes[1].interfaces[0]",
            "claim the same interface",
        ),
        (
            lambda d: d["planes"][1].update(cidrs=["::ffff:198.18.2.0/120"]),
            "planes[1].cidrs[0]",
            "IPv4-mapped",
        ),
        (lambda d: d["planes"][1].update(cidrs=["fd00:18:1::/48"]), "planes[1].cidrs[0]", "overlaps"),
    ],
)
def test_bad_plane_fields_name_the_field(mutate, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        snapshot_from_dict(_with(mutate))
    assert err.value.path == field
    assert words in str(err.value)


def test_routed_entries_may_be_shared_and_distinct_patterns_coexist() -> None:
    raw = _with(lambda d: [p.update(interfaces=["@routed", f"*-{p['name']}"]) for p in d["planes"]])
    assert [p.interfaces for p in snapshot_from_dict(raw).planes] == [("@routed", "*-oam"), ("@routed", "*-media")]


def test_listener_trace_sampling() -> None:
    """Static listeners add trace context by default; `trace_sampling` sets the percentage, null turns it off."""
    assert all(lsn.trace_sampling == 100.0 for lsn in snapshot_from_dict(GOOD).listeners)
    raw = _with(lambda d: (d["listeners"][0].update(trace_sampling=None), d["listeners"][1].update(trace_sampling=5)))
    snap = snapshot_from_dict(raw)
    assert (snap.listeners[0].trace_sampling, snap.listeners[1].trace_sampling) == (None, 5.0)
    for bad in (101, -1, "all", True):
        with pytest.raises(ConfigError, match=r"listeners\[0\]\.trace_sampling: .*not a percentage"):
            snapshot_from_dict(_with(lambda d, bad=bad: d["listeners"][0].update(trace_sampling=bad)))
