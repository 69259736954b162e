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
`PlaneRouting.desired`, `diff_rules`) are pure, in netplanes/routing_plan.py (the agent imports only those);
`install`/`remove`/`PlaneRouting.sync` apply them through pyroute2 (for the agent: in netplanes/nl_helper.py).
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from planemesh.model.planes import Plane
from planemesh.netplanes import routing_plan
from planemesh.netplanes.netlink import ipr_or_new
from planemesh.netplanes.routing_plan import (
    DEFAULT_PRIORITY,
    DEFAULT_TABLE,
    FAMILIES,
    FAMILY_NAME,
    PLANE_PRIORITY,
    LocalDelivery,
    MarkRule,
    diff_rules,
)

RTN_LOCAL = 2
SCOPE_HOST = 254
_ANY = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}
_FAMILY_NAME = FAMILY_NAME
LOCAL_DELIVERY = LocalDelivery()  # the default spec (frozen)


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


def installed(spec: LocalDelivery = LOCAL_DELIVERY, ipr: IPRoute | None = None) -> bool:
    """True if the rule and the route exist for every family of `spec`."""
    with ipr_or_new(ipr) as nl:
        return all(rules_present(spec, nl, f) and routes_present(spec, nl, f) for f in spec.families)


def install(spec: LocalDelivery = LOCAL_DELIVERY, ipr: IPRoute | None = None) -> list[str]:
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


def remove(spec: LocalDelivery = LOCAL_DELIVERY, ipr: IPRoute | None = None) -> list[str]:
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


@dataclass(frozen=True, slots=True)
class PlaneRouting(routing_plan.PlaneRouting):
    """routing_plan.PlaneRouting with the netlink side: what the kernel holds, and the sync to the plan."""

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
        return self.sync_rules(self.desired(planes), ipr)

    def sync_rules(self, desired: Iterable[MarkRule], ipr: IPRoute | None = None) -> list[str]:
        """Make the kernel hold exactly `desired` (this priority and mask's rules); returns what changed."""
        with ipr_or_new(ipr) as nl:
            add, drop = diff_rules(desired, self.observed(nl))
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


__all__ = [
    "DEFAULT_PRIORITY", "DEFAULT_TABLE", "FAMILIES", "PLANE_PRIORITY", "LocalDelivery", "MarkRule", "PlaneRouting",
    "add_rule", "delete_rule", "diff_rules", "install", "installed", "remove",
]  # fmt: skip
