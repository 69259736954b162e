"""Per-plane bandwidth and priority on an egress interface: the desired HTB tree and the diff. Pure.

One HTB root qdisc (handle PM_HTB_MAJOR:0) per shaped interface, one root class carrying the link rate,
and below it one leaf class per plane plus a default class for unmarked traffic (ARP/ND, UDP, ...):

    504d:      htb default ffff
    504d:1     root     rate = ceil = link
    504d:1PP   plane PP rate = ceil = SLA.bandwidth_mbit    (a hard cap, no borrowing)
               plane PP rate = floor, ceil = link           (no bandwidth: borrows what is free)
    504d:ffff  default  rate = floor, ceil = link

HTB prio = SLA.priority (0 highest): among classes borrowing spare capacity, lower prio goes first.
The egress classifier (ebpf/pm_egress.c) picks 504d:(0x100 + plane) from skb->mark.

`egress_plan(planes, link_mbit)` computes the tree; `diff(plan, observed)` lists the netlink operations
that turn what the interface has into it, never tearing down a tree that is already ours (a changed rate
is a `change` of that one class). ebpf/egress_shaper.py applies the operations through pyroute2.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from planemesh.ebpf.abi import (
    PM_HTB_DEFAULT_MINOR,
    PM_HTB_MAJOR,
    PM_HTB_ROOT_MINOR,
    PM_MAX_PLANES,
    htb_classid,
    plane_classid,
)
from planemesh.model.config import ConfigError
from planemesh.model.planes import Plane

QDISC_HANDLE = PM_HTB_MAJOR << 16
ROOT_CLASSID = htb_classid(PM_HTB_ROOT_MINOR)
DEFAULT_CLASSID = htb_classid(PM_HTB_DEFAULT_MINOR)
DEFAULT_LINK_MBIT = 10_000.0  # veths report no speed; 10 Gbit/s is a generous ceiling
FLOOR_MBIT = 1.0  # guaranteed rate of classes without a bandwidth of their own
DEFAULT_CLASS_PRIO = 3  # SLA's default priority
MTU = 1600
HZ = 1000  # the kernel's tick as HTB's default burst computation assumes it
MAX_QUANTUM = 200_000  # above this HTB warns "quantum of class is big" and clamps


def mbit_to_bytes(mbit: float) -> int:
    """Mbit/s -> bytes/s, the unit HTB keeps rates in."""
    return round(mbit * 1_000_000 / 8)


@dataclass(frozen=True, slots=True)
class HtbClass:
    classid: int
    parent: int
    rate: int  # bytes/s
    ceil: int  # bytes/s
    prio: int = DEFAULT_CLASS_PRIO
    plane_id: int | None = None  # None: root or default class

    @property
    def is_leaf(self) -> bool:
        return self.classid != ROOT_CLASSID

    @property
    def quantum(self) -> int:
        """Bytes a class may send per round when borrowing: rate/10 like r2q=10, kept in HTB's range."""
        return max(MTU, min(self.rate // 10, MAX_QUANTUM))

    @property
    def burst(self) -> int:
        """Bytes the class may send at once: one tick at the rate plus a 64 KiB GSO packet (veths and
        NICs hand HTB whole GSO super-packets; a burst below one of them makes the rate undershoot)."""
        return self.rate // HZ + 65536

    @property
    def cburst(self) -> int:
        return self.ceil // HZ + 65536

    def same_settings(self, other: HtbClass) -> bool:
        """Equal as the kernel reports them (rates compare within 0.1%: the kernel rounds)."""
        return (
            self.parent == other.parent
            and self.prio == other.prio
            and _close(self.rate, other.rate)
            and _close(self.ceil, other.ceil)
        )


def _close(a: int, b: int) -> bool:
    return abs(a - b) <= max(1, max(a, b) // 1000)


@dataclass(frozen=True, slots=True)
class EgressPlan:
    link_rate: int  # bytes/s
    classes: tuple[HtbClass, ...]  # root class first, then leaves by class id
    handle: int = QDISC_HANDLE
    default_classid: int = DEFAULT_CLASSID

    def by_id(self) -> dict[int, HtbClass]:
        return {c.classid: c for c in self.classes}


@dataclass(frozen=True, slots=True)
class ObservedEgress:
    """What an interface has at its root: the qdisc kind and handle, and (if it is an HTB) its classes."""

    root_kind: str | None = None  # None: no root qdisc reported
    root_handle: int = 0
    default_minor: int = 0
    classes: Mapping[int, HtbClass] = field(default_factory=dict)

    @property
    def ours(self) -> bool:
        return self.root_kind == "htb" and self.root_handle == QDISC_HANDLE


class OpKind(StrEnum):
    QDISC = "qdisc"  # replace the root qdisc with our HTB (only when it is not ours yet)
    DEFAULT = "default"  # change our HTB's default class
    ADD = "add"
    CHANGE = "change"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class EgressOp:
    kind: OpKind
    cls: HtbClass | None = None


def egress_plan(planes: Iterable[Plane], link_mbit: float = DEFAULT_LINK_MBIT) -> EgressPlan:
    """The HTB tree for these planes on a link of `link_mbit`. Raises ConfigError naming the plane."""
    if not isinstance(link_mbit, int | float) or not link_mbit >= FLOOR_MBIT:
        raise ConfigError("link_mbit", f"link rate {link_mbit!r} must be at least {FLOOR_MBIT} Mbit/s")
    link = mbit_to_bytes(link_mbit)
    floor = mbit_to_bytes(FLOOR_MBIT)
    root = HtbClass(ROOT_CLASSID, QDISC_HANDLE, link, link, DEFAULT_CLASS_PRIO)
    leaves = [HtbClass(DEFAULT_CLASSID, ROOT_CLASSID, floor, link, DEFAULT_CLASS_PRIO)]
    seen: set[int] = set()
    for plane in planes:
        where = f"planes.{plane.name}.sla"
        if not 1 <= plane.plane_id < PM_MAX_PLANES:
            raise ConfigError(f"planes.{plane.name}.plane_id", f"plane id {plane.plane_id} is outside 1..63")
        if plane.plane_id in seen:
            raise ConfigError(f"planes.{plane.name}.plane_id", f"plane id {plane.plane_id} is used twice")
        seen.add(plane.plane_id)
        prio = plane.sla.priority
        if not isinstance(prio, int) or not 0 <= prio <= 7:
            raise ConfigError(f"{where}.priority", f"priority {prio!r} is outside 0..7")
        bandwidth = plane.sla.bandwidth_mbit
        if bandwidth is None:
            rate, ceil = floor, link
        else:
            if not isinstance(bandwidth, int | float) or not FLOOR_MBIT / 1000 <= bandwidth <= link_mbit:
                raise ConfigError(
                    f"{where}.bandwidth_mbit", f"{bandwidth!r} Mbit/s is outside 0.001..{link_mbit:g} (the link rate)"
                )
            rate = ceil = mbit_to_bytes(bandwidth)
        leaves.append(HtbClass(plane_classid(plane.plane_id), ROOT_CLASSID, rate, ceil, prio, plane.plane_id))
    leaves.sort(key=lambda c: c.classid)
    return EgressPlan(link_rate=link, classes=(root, *leaves))


def diff(plan: EgressPlan, observed: ObservedEgress) -> list[EgressOp]:
    """Operations turning `observed` into `plan`, in order: qdisc, then adds and changes parents first,
    then deletes leaves first. A tree that is already ours is only edited, never replaced."""
    ops: list[EgressOp] = []
    current: Mapping[int, HtbClass] = observed.classes
    if not observed.ours:
        ops.append(EgressOp(OpKind.QDISC))
        current = {}
    elif observed.default_minor != plan.default_classid & 0xFFFF:
        ops.append(EgressOp(OpKind.DEFAULT))
    for cls in plan.classes:  # root first: a leaf's parent exists before the leaf
        have = current.get(cls.classid)
        if have is None:
            ops.append(EgressOp(OpKind.ADD, cls))
        elif not cls.same_settings(have):
            ops.append(EgressOp(OpKind.CHANGE, cls))
    wanted = plan.by_id()
    for classid in sorted(set(current) - set(wanted), key=lambda c: (c == ROOT_CLASSID, c)):
        ops.append(EgressOp(OpKind.DELETE, current[classid]))
    return ops


__all__ = [
    "DEFAULT_CLASSID",
    "QDISC_HANDLE",
    "ROOT_CLASSID",
    "EgressOp",
    "EgressPlan",
    "HtbClass",
    "ObservedEgress",
    "OpKind",
    "diff",
    "egress_plan",
    "mbit_to_bytes",
]
