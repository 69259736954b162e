"""The netlink side of per-plane egress shaping, through pyroute2: read our HTB tree, apply a plan's diff with the
pm_egress.c classifier on it, remove it. ebpf/egress_shaper.py holds the program and calls these through a
TcHooks (ebpf/tc_hooks.py): in this process, or in the agent's netlink helper (netplanes/nl_helper.py)."""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from planemesh.ebpf import abi
from planemesh.ebpf.egress_spec import ETH_P_ALL, FILTER_HANDLE, FILTER_PRIO, PROGRAM, TC_H_ROOT, ShapingError
from planemesh.netplanes.htb_plan import QDISC_HANDLE, EgressOp, EgressPlan, HtbClass, ObservedEgress, OpKind, diff


@dataclass(frozen=True, slots=True)
class ClassStats:
    bytes: int
    packets: int
    drops: int


def observe(ipr: IPRoute, ifindex: int) -> ObservedEgress:
    """The interface's root qdisc and, if it is our HTB, its classes."""
    root = next((q for q in ipr.get_qdiscs(index=ifindex) if q["parent"] == TC_H_ROOT), None)
    if root is None:
        return ObservedEgress()
    kind = root.get_attr("TCA_KIND")
    observed = ObservedEgress(root_kind=kind, root_handle=root["handle"])
    if not observed.ours:
        return observed
    options = root.get_attr("TCA_OPTIONS")
    init = options.get_attr("TCA_HTB_INIT") if options else None
    classes: dict[int, HtbClass] = {}
    for msg in ipr.get_classes(index=ifindex):
        if msg.get_attr("TCA_KIND") != "htb" or msg["handle"] >> 16 != abi.PM_HTB_MAJOR:
            continue
        options = msg.get_attr("TCA_OPTIONS")
        parms = options.get_attr("TCA_HTB_PARMS")
        rate64, ceil64 = options.get_attr("TCA_HTB_RATE64"), options.get_attr("TCA_HTB_CEIL64")
        parent = msg["parent"]
        classes[msg["handle"]] = HtbClass(
            classid=msg["handle"],
            parent=QDISC_HANDLE if parent == TC_H_ROOT else parent,
            rate=rate64 or parms["rate"],
            ceil=ceil64 or parms["ceil"],
            prio=parms["prio"],
        )
    return ObservedEgress(kind, root["handle"], init["defcls"] if init else 0, classes)


def class_stats(ipr: IPRoute, ifindex: int) -> dict[int, ClassStats]:
    """classid -> bytes/packets/drops of our HTB classes (what the shaper actually sent)."""
    found = {}
    for msg in ipr.get_classes(index=ifindex):
        if msg.get_attr("TCA_KIND") != "htb" or msg["handle"] >> 16 != abi.PM_HTB_MAJOR:
            continue
        stats = msg.get_attr("TCA_STATS2")
        basic = stats.get_attr("TCA_STATS_BASIC") if stats else None
        queue = stats.get_attr("TCA_STATS_QUEUE") if stats else None
        found[msg["handle"]] = ClassStats(
            bytes=basic["bytes"] if basic else 0,
            packets=basic["packets"] if basic else 0,
            drops=queue["drops"] if queue else 0,
        )
    return found


def _class_args(cls: HtbClass) -> dict:
    return {
        "parent": cls.parent,
        "rate": cls.rate,
        "ceil": cls.ceil,
        "burst": cls.burst,
        "cburst": cls.cburst,
        "prio": cls.prio,
        "quantum": cls.quantum,
    }


def _run(ipr: IPRoute, ifindex: int, plan: EgressPlan, op: EgressOp) -> None:
    if op.kind is OpKind.QDISC:
        # `replace` on the root swaps whatever was there (the kernel default) for our HTB in one step.
        ipr.tc("replace", "htb", ifindex, plan.handle, parent=TC_H_ROOT, default=plan.default_classid & 0xFFFF)
    elif op.kind is OpKind.DEFAULT:
        ipr.tc("change", "htb", ifindex, plan.handle, parent=TC_H_ROOT, default=plan.default_classid & 0xFFFF)
    elif op.kind is OpKind.ADD:
        assert op.cls is not None
        ipr.tc("add-class", "htb", ifindex, op.cls.classid, **_class_args(op.cls))
    elif op.kind is OpKind.CHANGE:
        assert op.cls is not None
        ipr.tc("change-class", "htb", ifindex, op.cls.classid, **_class_args(op.cls))
    elif op.kind is OpKind.DELETE:
        assert op.cls is not None
        # pyroute2 encodes HTB rate tables even for a delete, so the class settings ride along.
        ipr.tc("del-class", "htb", ifindex, op.cls.classid, **_class_args(op.cls))


def apply_plan(ipr: IPRoute, ifindex: int, plan: EgressPlan, prog_fd: int) -> list[EgressOp]:
    """Make `ifindex` carry `plan` (a diff against what it has) and our classifier; returns the operations run."""
    ops = diff(plan, observe(ipr, ifindex))
    try:
        for op in ops:
            _run(ipr, ifindex, plan, op)
        # replace-filter on a fixed (prio, handle): idempotent, and a restarted agent swaps in
        # its own program without a gap.
        ipr.tc(
            "replace-filter",
            "bpf",
            ifindex,
            FILTER_HANDLE,
            fd=prog_fd,
            name=PROGRAM,
            parent=plan.handle,
            classid=plan.handle,  # the major of every class the program picks (see pm_egress.c)
            prio=FILTER_PRIO,
            protocol=ETH_P_ALL,
            direct_action=True,
        )
    except NetlinkError as exc:
        raise ShapingError(f"interface {ifindex}: {exc}") from exc
    return ops


def remove_plan(ipr: IPRoute, ifindex: int) -> bool:
    """Delete our HTB root (its classes and filter go with it); True if there was one. A vanished interface
    counts as removed."""
    try:
        if not observe(ipr, ifindex).ours:
            return False
        ipr.tc("del", "htb", ifindex, QDISC_HANDLE, parent=TC_H_ROOT)
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            return False
        raise
    return True


__all__ = ["ClassStats", "apply_plan", "class_stats", "observe", "remove_plan"]
