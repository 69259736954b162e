"""Per-plane egress shaping applied through pyroute2: the HTB tree of netplanes.htb_plan plus the
pm_egress.c classifier on it.

    shaper = EgressShaper(pin_dir)                           # loads pm_egress.c once (ebpf/build.py)
    shaper.apply(ifindex, egress_plan(planes, link_mbit))    # diff: only what changed is touched
    shaper.remove(ifindex)                                   # our HTB goes; the kernel's default returns
    shaper.close()

Why a filter on the HTB qdisc rather than clsact egress + skb->priority: the classifier then lives and
dies with the qdisc it classifies for (removing the HTB removes it, nothing is left on a shared clsact
hook the ingress program also uses), and HTB consults skb->priority *before* its filters, so an
application's SO_PRIORITY could otherwise pick a plane's class; with the filter, the mark set by our own
programs decides. Works on any interface of the netns of the IPRoute given (default: the calling
thread's). Runs on the agent's control thread.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from planemesh.ebpf import abi, build
from planemesh.netplanes.htb_plan import (
    QDISC_HANDLE,
    EgressOp,
    EgressPlan,
    HtbClass,
    ObservedEgress,
    OpKind,
    diff,
)
from planemesh.netplanes.netlink import ipr_or_new

EBPF_DIR = Path(__file__).resolve().parent
SOURCE = EBPF_DIR / "pm_egress.c"
PROGRAM = "pm_tc_egress"
TC_H_ROOT = 0xFFFFFFFF
FILTER_PRIO = 0x504D
FILTER_HANDLE = 0x1
ETH_P_ALL = 0x0003
SPEC = build.ProgramSpec(SOURCE, (f"-I{EBPF_DIR}",), ((PROGRAM, "SCHED_CLS", None),))

log = logging.getLogger("planemesh.bandwidth")


class ShapingError(RuntimeError):
    """The egress classifier cannot be loaded or the HTB tree cannot be applied."""


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
    init = (root.get_attr("TCA_OPTIONS") or {}).get_attr("TCA_HTB_INIT") if root.get_attr("TCA_OPTIONS") else None
    classes: dict[int, HtbClass] = {}
    for msg in ipr.get_classes(index=ifindex):
        if msg.get_attr("TCA_KIND") != "htb" or msg["handle"] >> 16 != abi.PM_HTB_MAJOR:
            continue
        parms = msg.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_PARMS")
        rate64 = msg.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_RATE64")
        ceil64 = msg.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_CEIL64")
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


class EgressShaper:
    """One compiled egress classifier, attached to the HTB qdisc of every interface it shapes."""

    def __init__(self, pin_dir: str | None = None) -> None:
        """pin_dir (already validated, e.g. the Datapath's): pin the program there under its content
        hash, so the next agent re-uses it and compiles nothing. bcc runs in a helper process."""
        try:
            self._loaded = build.load(SPEC, pin_dir)
        except (build.BuildError, OSError) as exc:
            raise ShapingError(f"cannot load {SOURCE.name}: {exc}") from exc
        self.prog_fd = self._loaded.programs[PROGRAM]
        self.compiled = self._loaded.compiled
        self.shaped: set[int] = set()

    def apply(self, ifindex: int, plan: EgressPlan, ipr: IPRoute | None = None) -> list[EgressOp]:
        """Make `ifindex` carry `plan` (a diff against what it has) and our classifier; returns the
        operations run. Re-applying an unchanged plan runs none and only refreshes the filter."""
        with ipr_or_new(ipr) as nl:
            ops = diff(plan, observe(nl, ifindex))
            try:
                for op in ops:
                    _run(nl, ifindex, plan, op)
                # replace-filter on a fixed (prio, handle): idempotent, and a restarted agent swaps in
                # its own program without a gap.
                nl.tc(
                    "replace-filter",
                    "bpf",
                    ifindex,
                    FILTER_HANDLE,
                    fd=self.prog_fd,
                    name=PROGRAM,
                    parent=plan.handle,
                    classid=plan.handle,  # the major of every class the program picks (see pm_egress.c)
                    prio=FILTER_PRIO,
                    protocol=ETH_P_ALL,
                    direct_action=True,
                )
            except NetlinkError as exc:
                raise ShapingError(f"interface {ifindex}: {exc}") from exc
        self.shaped.add(ifindex)
        if ops:
            log.debug("egress %d: %s", ifindex, ", ".join(f"{o.kind} {o.cls.classid if o.cls else ''}" for o in ops))
        return ops

    def remove(self, ifindex: int, ipr: IPRoute | None = None) -> bool:
        """Delete our HTB root (its classes and filter go with it); the kernel puts the interface's
        default qdisc back. True if there was one. A vanished interface counts as removed."""
        self.shaped.discard(ifindex)
        with ipr_or_new(ipr) as nl:
            try:
                if not observe(nl, ifindex).ours:
                    return False
                nl.tc("del", "htb", ifindex, QDISC_HANDLE, parent=TC_H_ROOT)
            except NetlinkError as exc:
                if exc.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                    return False
                raise
        return True

    def close(self, remove: bool = True, ipr: IPRoute | None = None) -> None:
        """Release the program; remove=True also takes our HTB off every interface shaped here."""
        if remove:
            with ipr_or_new(ipr) as nl:
                for ifindex in sorted(self.shaped):
                    self.remove(ifindex, nl)
        self._loaded.close()


__all__ = ["ClassStats", "EgressShaper", "ShapingError", "class_stats", "observe"]
