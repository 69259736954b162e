"""Policy-routing plans, pure (no netlink): the fwmark rules and the route the data path needs, and the diff of rule
sets. netplanes/routing.py applies them through pyroute2 (in the agent, inside netplanes/nl_helper.py) and
explains the rules.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass

from planemesh.ebpf.abi import PM_MARK_LOCAL, PM_MARK_OWN, PM_MARK_PLANE_MASK
from planemesh.model.planes import LOCAL_DELIVERY_TABLE, Plane

DEFAULT_TABLE = LOCAL_DELIVERY_TABLE
DEFAULT_PRIORITY = 1000  # after `local` (0), before `main` (32766)
PLANE_PRIORITY = DEFAULT_PRIORITY + 1  # plane rules: right after local delivery
FAMILIES = (socket.AF_INET, socket.AF_INET6)
FAMILY_NAME = {socket.AF_INET: "v4", socket.AF_INET6: "v6"}


@dataclass(frozen=True, slots=True)
class MarkRule:
    """`ip rule fwmark mark/mask lookup table priority P`, once per family."""

    mark: int
    mask: int
    table: int
    priority: int
    families: tuple[int, ...] = FAMILIES

    def __post_init__(self) -> None:
        if not self.mark or self.mark & ~self.mask:
            raise ValueError(f"mark {self.mark:#x} must be non-zero and inside mask {self.mask:#x}")
        if not 0 < self.table < 2**32 or self.table in (253, 254, 255):
            raise ValueError(f"table {self.table} is not a private routing table")
        if not 0 < self.priority < 32766:
            raise ValueError(f"priority {self.priority} must sit between the local and main rules")
        if not set(self.families) <= set(FAMILIES):
            raise ValueError(f"families {self.families} must be AF_INET and/or AF_INET6")

    def describe(self, family: int) -> str:
        return (
            f"{FAMILY_NAME[family]} rule fwmark {self.mark:#x}/{self.mask:#x} table {self.table} prio {self.priority}"
        )


@dataclass(frozen=True, slots=True)
class LocalDelivery(MarkRule):
    """Packets whose mark matches mark/mask are delivered locally via `table` (which holds `local default`)."""

    mark: int = PM_MARK_LOCAL
    mask: int = PM_MARK_LOCAL
    table: int = DEFAULT_TABLE
    priority: int = DEFAULT_PRIORITY
    families: tuple[int, ...] = FAMILIES


# ---- plane rules: the proxy's own traffic of a plane routed in the plane's table --------------------


def diff_rules(desired: Iterable[MarkRule], observed: Iterable[MarkRule]) -> tuple[list[MarkRule], list[MarkRule]]:
    """(to add, to remove), single-family rules compared whole. Apply adds first: a plane whose table changes
    keeps a rule all along (rules of one priority match in insertion order, so the old one wins until removed)."""
    want, have = set(desired), set(observed)
    return sorted(want - have, key=_rule_order), sorted(have - want, key=_rule_order)


def _rule_order(rule: MarkRule) -> tuple[tuple[int, ...], int, int]:
    return (rule.families, rule.mark, rule.table)


@dataclass(frozen=True, slots=True)
class PlaneRouting:
    """One rule per plane with a table and per IP version it has CIDRs of (both when it has none):

        fwmark (own_mark | plane_id)/(own_mark | PLANE_MASK) lookup <plane.table> priority <priority>

    Ours are the rules at `priority` with exactly that mask: `observed` finds them whoever installed them
    (a previous agent that left them for us), so `sync` also removes what an earlier configuration left."""

    own_mark: int = PM_MARK_OWN
    priority: int = PLANE_PRIORITY

    @property
    def mask(self) -> int:
        return self.own_mark | PM_MARK_PLANE_MASK

    def desired(self, planes: Iterable[Plane]) -> frozenset[MarkRule]:
        rules = set()
        for plane in planes:
            if plane.table is None:
                continue
            versions = {net.version for net in plane.cidrs} or {4, 6}
            for family in FAMILIES:
                if (4 if family == socket.AF_INET else 6) in versions:
                    rules.add(
                        MarkRule(self.own_mark | plane.plane_id, self.mask, plane.table, self.priority, (family,))
                    )
        return frozenset(rules)
