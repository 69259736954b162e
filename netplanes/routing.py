"""Policy routing that delivers intercepted packets locally, for IPv4 and IPv6.

The TC program assigns an intercepted packet to the proxy's socket and sets the "route locally"
mark; this module makes the kernel deliver such packets to the local stack whatever their
destination address:

    ip rule add fwmark MARK/MASK lookup TABLE priority PRIO        (v4 and v6)
    ip route add local default dev lo table TABLE scope host       (v4 and v6)

It works in the network namespace of the IPRoute it is given (by default one opened in the
calling thread's current namespace), is idempotent, and removes only the rule and route it
describes. The plan (`desired`) is pure; `install`/`remove` apply it.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from planemesh.ebpf.abi import PM_MARK_LOCAL
from planemesh.netplanes.netlink import ipr_or_new

DEFAULT_TABLE = 0x504D  # 20557 ("PM")
DEFAULT_PRIORITY = 1000  # after `local` (0), before `main` (32766)
RTN_LOCAL = 2
SCOPE_HOST = 254
FAMILIES = (socket.AF_INET, socket.AF_INET6)
_ANY = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}


@dataclass(frozen=True, slots=True)
class LocalDelivery:
    """Packets whose mark matches mark/mask are delivered locally via `table`."""

    mark: int = PM_MARK_LOCAL
    mask: int = PM_MARK_LOCAL
    table: int = DEFAULT_TABLE
    priority: int = DEFAULT_PRIORITY
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


def _rule_matches(msg, spec: LocalDelivery) -> bool:  # type: ignore[no-untyped-def]
    table = msg.get_attr("FRA_TABLE") or msg["table"]
    return (
        msg.get_attr("FRA_PRIORITY") == spec.priority
        and table == spec.table
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


def rules_present(spec: LocalDelivery, ipr: IPRoute, family: int) -> list:
    return [m for m in ipr.get_rules(family=family) if _rule_matches(m, spec)]


def routes_present(spec: LocalDelivery, ipr: IPRoute, family: int) -> list:
    lo = _lo_index(ipr)
    try:
        routes = ipr.get_routes(family=family, table=spec.table)
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            return []
        raise
    return [m for m in routes if _route_matches(m, spec, lo)]


def installed(spec: LocalDelivery = LocalDelivery(), ipr: IPRoute | None = None) -> bool:
    """True if the rule and the route exist for every family of `spec`."""
    with ipr_or_new(ipr) as nl:
        return all(rules_present(spec, nl, f) and routes_present(spec, nl, f) for f in spec.families)


def install(spec: LocalDelivery = LocalDelivery(), ipr: IPRoute | None = None) -> list[str]:
    """Add what is missing; returns a description of each change (empty when already installed)."""
    done: list[str] = []
    with ipr_or_new(ipr) as nl:
        lo = _lo_index(nl)
        for family in spec.families:
            name = "v4" if family == socket.AF_INET else "v6"
            if not routes_present(spec, nl, family):
                with _tolerate(errno.EEXIST):
                    nl.route(
                        "add", family=family, dst=_ANY[family], type="local", table=spec.table, oif=lo,
                        scope=SCOPE_HOST,
                    )
                done.append(f"{name} route local default dev lo table {spec.table}")
            if not rules_present(spec, nl, family):
                nl.rule(
                    "add", family=family, fwmark=spec.mark, fwmask=spec.mask, table=spec.table,
                    priority=spec.priority,
                )
                done.append(f"{name} rule fwmark {spec.mark:#x}/{spec.mask:#x} table {spec.table} prio {spec.priority}")
    return done


def remove(spec: LocalDelivery = LocalDelivery(), ipr: IPRoute | None = None) -> list[str]:
    """Remove our rule and route (rule first, so marked packets never meet an empty table)."""
    done: list[str] = []
    with ipr_or_new(ipr) as nl:
        lo = _lo_index(nl)
        for family in spec.families:
            name = "v4" if family == socket.AF_INET else "v6"
            for _ in rules_present(spec, nl, family):
                with _tolerate(errno.ENOENT):
                    nl.rule(
                        "del", family=family, fwmark=spec.mark, fwmask=spec.mask, table=spec.table,
                        priority=spec.priority,
                    )
                done.append(f"{name} rule prio {spec.priority}")
            for _ in routes_present(spec, nl, family):
                with _tolerate(errno.ENOENT, errno.ESRCH):
                    nl.route(
                        "del", family=family, dst=_ANY[family], type="local", table=spec.table, oif=lo,
                        scope=SCOPE_HOST,
                    )
                done.append(f"{name} route table {spec.table}")
    return done


@contextlib.contextmanager
def _tolerate(*codes: int) -> Iterator[None]:
    try:
        yield
    except NetlinkError as exc:
        if exc.code not in codes:
            raise
