"""Policy routing the data path needs, for IPv4 and IPv6: fwmark rules (and the one route they need).

1. Local delivery of intercepted packets. The TC program assigns an intercepted packet to the proxy's
   socket and sets the "route locally" mark; the kernel then delivers it whatever its destination:

       ip rule add fwmark LOCAL/LOCAL lookup TABLE priority 1000        (v4 and v6)
       ip route add local default dev lo table TABLE scope host         (v4 and v6)

2. Plane-correct forwarding of the proxy's own traffic. Its sockets carry SO_MARK = OWN | plane id; a
   plane that names its routing table (VRF-like telecom nodes: one table per plane, `iif` rules for
   forwarded traffic) gets

       ip rule add fwmark (OWN|plane)/(OWN|0x3f) lookup <plane table> priority 1001

   so its upstream connections leave through the plane of their destination instead of the main
   table's default route (the multi-plane loop: docs/planes.md).

Everything works in the network namespace of the IPRoute it is given (by default one opened in the
calling thread's namespace), is idempotent and removes only what it describes. Plans (`MarkRule`,
`PlaneRouting.desired`, `diff_rules`) are pure; `install`/`remove`/`PlaneRouting.sync` apply them.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from planemesh.ebpf.abi import PM_MARK_LOCAL, PM_MARK_OWN, PM_MARK_PLANE_MASK
from planemesh.model.planes import LOCAL_DELIVERY_TABLE, Plane
from planemesh.netplanes.netlink import ipr_or_new

DEFAULT_TABLE = LOCAL_DELIVERY_TABLE
DEFAULT_PRIORITY = 1000  # after `local` (0), before `main` (32766)
PLANE_PRIORITY = DEFAULT_PRIORITY + 1  # plane rules: right after local delivery
RTN_LOCAL = 2
SCOPE_HOST = 254
FAMILIES = (socket.AF_INET, socket.AF_INET6)
_ANY = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}
_FAMILY_NAME = {socket.AF_INET: "v4", socket.AF_INET6: "v6"}


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
            f"{_FAMILY_NAME[family]} rule fwmark {self.mark:#x}/{self.mask:#x} table {self.table} prio {self.priority}"
        )


@dataclass(frozen=True, slots=True)
class LocalDelivery(MarkRule):
    """Packets whose mark matches mark/mask are delivered locally via `table` (which holds `local default`)."""

    mark: int = PM_MARK_LOCAL
    mask: int = PM_MARK_LOCAL
    table: int = DEFAULT_TABLE
    priority: int = DEFAULT_PRIORITY
    families: tuple[int, ...] = FAMILIES


def _rule_table(msg) -> int:  # type: ignore[no-untyped-def]
    return msg.get_attr("FRA_TABLE") or msg["table"]


def _rule_matches(msg, spec: MarkRule) -> bool:  # type: ignore[no-untyped-def]
    return (
        msg.get_attr("FRA_PRIORITY") == spec.priority
        and _rule_table(msg) == spec.table
        and msg.get_attr("FRA_FWMARK") == spec.mark
        and (msg.get_attr("FRA_FWMASK") or 0xFFFFFFFF) == spec.mask
    )


def _route_matches(msg, spec: LocalDelivery, lo: int) -> bool:  # type: ignore[no-untyped-def]
    table = msg.get_attr("RTA_TABLE") or msg["table"]
    return table == spec.table and msg["type"] == RTN_LOCAL and msg["dst_len"] == 0 and msg.get_attr("RTA_OIF") == lo


def _lo_index(ipr: IPRoute) -> int:
    found = ipr.link_lookup(ifname="lo")
    if not found:
        raise RuntimeError("this network namespace has no loopback interface")
    return found[0]


def rules_present(spec: MarkRule, ipr: IPRoute, family: int) -> list:
    return [m for m in ipr.get_rules(family=family) if _rule_matches(m, spec)]


def _rule(nl: IPRoute, command: str, spec: MarkRule, family: int) -> None:
    nl.rule(command, family=family, fwmark=spec.mark, fwmask=spec.mask, table=spec.table, priority=spec.priority)


def add_rule(spec: MarkRule, ipr: IPRoute | None = None) -> list[str]:
    """Add the rule for every family where it is missing; returns what was added."""
    done: list[str] = []
    with ipr_or_new(ipr) as nl:
        for family in spec.families:
            if not rules_present(spec, nl, family):
                with _tolerate(errno.EEXIST):
                    _rule(nl, "add", spec, family)
                done.append(spec.describe(family))
    return done


def delete_rule(spec: MarkRule, ipr: IPRoute | None = None) -> list[str]:
    """Delete every copy of the rule, for every family; returns what was deleted."""
    done: list[str] = []
    with ipr_or_new(ipr) as nl:
        for family in spec.families:
            for _ in rules_present(spec, nl, family):
                with _tolerate(errno.ENOENT):
                    _rule(nl, "del", spec, family)
                done.append(spec.describe(family))
    return done


def routes_present(spec: LocalDelivery, ipr: IPRoute, family: int) -> list:
    lo = _lo_index(ipr)
    try:
        routes = ipr.get_routes(family=family, table=spec.table)
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            return []
        raise
    return [m for m in routes if _route_matches(m, spec, lo)]


def _local_route(nl: IPRoute, command: str, spec: LocalDelivery, family: int, lo: int) -> None:
    # Deleting needs scope host too, or the kernel finds no such route.
    nl.route(command, family=family, dst=_ANY[family], type="local", table=spec.table, oif=lo, scope=SCOPE_HOST)


def installed(spec: LocalDelivery = LocalDelivery(), ipr: IPRoute | None = None) -> bool:
    """True if the rule and the route exist for every family of `spec`."""
    with ipr_or_new(ipr) as nl:
        return all(rules_present(spec, nl, f) and routes_present(spec, nl, f) for f in spec.families)


def install(spec: LocalDelivery = LocalDelivery(), ipr: IPRoute | None = None) -> list[str]:
    """Add what is missing (route before rule: a marked packet never meets an empty table); returns a
    description of each change (empty when already installed)."""
    done: list[str] = []
    with ipr_or_new(ipr) as nl:
        lo = _lo_index(nl)
        for family in spec.families:
            if not routes_present(spec, nl, family):
                with _tolerate(errno.EEXIST):
                    _local_route(nl, "add", spec, family, lo)
                done.append(f"{_FAMILY_NAME[family]} route local default dev lo table {spec.table}")
        done += add_rule(spec, nl)
    return done


def remove(spec: LocalDelivery = LocalDelivery(), ipr: IPRoute | None = None) -> list[str]:
    """Remove our rule and route (rule first, so marked packets never meet an empty table)."""
    with ipr_or_new(ipr) as nl:
        done = delete_rule(spec, nl)
        lo = _lo_index(nl)
        for family in spec.families:
            for _ in routes_present(spec, nl, family):
                with _tolerate(errno.ENOENT, errno.ESRCH):
                    _local_route(nl, "del", spec, family, lo)
                done.append(f"{_FAMILY_NAME[family]} route table {spec.table}")
    return done


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

    def observed(self, ipr: IPRoute | None = None) -> frozenset[MarkRule]:
        found = set()
        with ipr_or_new(ipr) as nl:
            for family in FAMILIES:
                for msg in nl.get_rules(family=family):
                    mark = msg.get_attr("FRA_FWMARK")
                    ours = msg.get_attr("FRA_PRIORITY") == self.priority and msg.get_attr("FRA_FWMASK") == self.mask
                    if ours and mark:
                        found.add(MarkRule(mark, self.mask, _rule_table(msg), self.priority, (family,)))
        return frozenset(found)

    def sync(self, planes: Iterable[Plane], ipr: IPRoute | None = None) -> list[str]:
        """Make the kernel hold exactly the desired plane rules; returns what changed."""
        with ipr_or_new(ipr) as nl:
            add, drop = diff_rules(self.desired(planes), self.observed(nl))
            done = [f"add {line}" for rule in add for line in add_rule(rule, nl)]
            done += [f"del {line}" for rule in drop for line in delete_rule(rule, nl)]
        return done

    def remove(self, ipr: IPRoute | None = None) -> list[str]:
        return self.sync((), ipr)


@contextlib.contextmanager
def _tolerate(*codes: int) -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        if exc.code not in codes:
            raise
