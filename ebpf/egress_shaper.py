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
thread's). Runs on the agent's control thread. The netlink side (ebpf/egress_netlink.py, pyroute2) runs through
a TcHooks (ebpf/tc_hooks.py): in the agent, its short-lived netlink helper; this module imports no pyroute2.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from planemesh.ebpf import build
from planemesh.ebpf.egress_spec import (  # re-exported: the names the shaper's users know
    ETH_P_ALL,
    FILTER_HANDLE,
    FILTER_PRIO,
    PROGRAM,
    SOURCE,
    SPEC,
    TC_H_ROOT,
    ShapingError,
)
from planemesh.netplanes.htb_plan import EgressOp, EgressPlan

if TYPE_CHECKING:
    from pyroute2 import IPRoute

    from planemesh.ebpf.tc_hooks import TcHooks

log = logging.getLogger("planemesh.bandwidth")


class EgressShaper:
    """One compiled egress classifier, attached to the HTB qdisc of every interface it shapes."""

    def __init__(self, pin_dir: str | None = None, tc: TcHooks | None = None) -> None:
        """pin_dir (already validated, e.g. the Datapath's): pin the program there under its content
        hash, so the next agent re-uses it and compiles nothing. bcc runs in a helper process.
        tc: where the netlink calls run (default: here, through pyroute2)."""
        try:
            self._loaded = build.load(SPEC, pin_dir)
        except (build.BuildError, OSError) as exc:
            raise ShapingError(f"cannot load {SOURCE.name}: {exc}") from exc
        self.prog_fd = self._loaded.programs[PROGRAM]
        self.compiled = self._loaded.compiled
        self.shaped: set[int] = set()
        self.tc = tc

    def _hooks(self, ipr: IPRoute | None) -> TcHooks:
        if ipr is None and self.tc is not None:
            return self.tc
        from planemesh.ebpf.tc_attach import LocalTc  # pyroute2: only where no other TcHooks was given

        return LocalTc(ipr)

    def apply(self, ifindex: int, plan: EgressPlan, ipr: IPRoute | None = None) -> list[EgressOp]:
        """Make `ifindex` carry `plan` (a diff against what it has) and our classifier; returns the
        operations run. Re-applying an unchanged plan runs none and only refreshes the filter."""
        ops = self._hooks(ipr).egress_apply(ifindex, plan, self.prog_fd)
        self.shaped.add(ifindex)
        if ops:
            log.debug("egress %d: %s", ifindex, ", ".join(f"{o.kind} {o.cls.classid if o.cls else ''}" for o in ops))
        return ops

    def remove(self, ifindex: int, ipr: IPRoute | None = None) -> bool:
        """Delete our HTB root (its classes and filter go with it); the kernel puts the interface's
        default qdisc back. True if there was one. A vanished interface counts as removed."""
        self.shaped.discard(ifindex)
        return self._hooks(ipr).egress_remove(ifindex)

    def close(self, remove: bool = True, ipr: IPRoute | None = None) -> None:
        """Release the program; remove=True also takes our HTB off every interface shaped here."""
        if remove:
            hooks = self._hooks(ipr)
            for ifindex in sorted(self.shaped):
                self.shaped.discard(ifindex)
                hooks.egress_remove(ifindex)
        self._loaded.close()


__all__ = [
    "ETH_P_ALL", "FILTER_HANDLE", "FILTER_PRIO", "PROGRAM", "SOURCE", "SPEC", "TC_H_ROOT",
    "EgressShaper", "ShapingError",
]  # fmt: skip
