"""Plane rules (netplanes.routing.PlaneRouting): which fwmark rules a configuration wants, and the diff."""

from __future__ import annotations

import socket

import pytest

from planemesh.ebpf.abi import PM_MARK_OWN, PM_MARK_PLANE_MASK
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import Plane
from planemesh.netplanes.routing import PLANE_PRIORITY, MarkRule, PlaneRouting, diff_rules

V4, V6 = socket.AF_INET, socket.AF_INET6
MASK = PM_MARK_OWN | PM_MARK_PLANE_MASK


def plane(name: str, plane_id: int, table: int | None, *cidrs: str) -> Plane:
    return Plane(name, plane_id, (f"*-{name}",), tuple(IPNetwork(c) for c in cidrs), table=table)


def rule(plane_id: int, table: int, family: int) -> MarkRule:
    return MarkRule(PM_MARK_OWN | plane_id, MASK, table, PLANE_PRIORITY, (family,))


def test_one_rule_per_plane_with_a_table_and_per_ip_version_it_has() -> None:
    planes = [
        plane("oam", 1, 101, "198.18.1.0/24", "fd00:18:1::/64"),
        plane("sig", 2, None, "198.18.2.0/24"),  # no table: main table, no rule
        plane("media", 3, 103, "fd00:18:3::/64"),  # IPv6 only: no v4 rule
        plane("bare", 4, 104),  # no CIDRs: both
    ]
    assert PlaneRouting().desired(planes) == {
        rule(1, 101, V4), rule(1, 101, V6), rule(3, 103, V6), rule(4, 104, V4), rule(4, 104, V6),
    }  # fmt: skip


def test_the_mark_matches_what_the_proxy_sets() -> None:
    (r,) = PlaneRouting().desired([plane("media", 3, 103, "fd00:18:3::/64")])
    so_mark = PM_MARK_OWN | 3  # agent/worker_process.py: upstream_mark = own mark | plane id
    assert so_mark & r.mask == r.mark
    assert (PM_MARK_OWN | 4) & r.mask != r.mark  # another plane's upstream does not match
    assert 3 & r.mask != r.mark  # nor a packet that only carries the plane bits (bypassed traffic)


def test_diff_adds_before_it_removes_and_leaves_the_rest() -> None:
    old = {rule(1, 101, V4), rule(2, 102, V4), rule(2, 102, V6)}
    new = {rule(1, 101, V4), rule(2, 202, V4), rule(3, 103, V6)}
    add, drop = diff_rules(new, old)
    assert set(add) == {rule(2, 202, V4), rule(3, 103, V6)}
    assert set(drop) == {rule(2, 102, V4), rule(2, 102, V6)}
    assert diff_rules(new, new) == ([], [])


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError):
        MarkRule(PM_MARK_OWN | 1, MASK, 254, PLANE_PRIORITY)
    with pytest.raises(ValueError):
        MarkRule(PM_MARK_OWN | 0x40, MASK, 100, PLANE_PRIORITY)  # mark outside its mask
