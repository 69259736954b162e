"""Attach/detach the classifier on an interface's clsact ingress hook, via pyroute2, in the netns of
the IPRoute given (the caller's current one by default).

Our filter is recognised by a fixed priority and handle on the ingress parent; `replace-filter` on
that (prio, handle) makes attach idempotent and lets a restarted agent swap in its freshly loaded
program without a gap. Detach removes only that filter, and the clsact qdisc only when we created it
and nothing else uses it.
"""

from __future__ import annotations

import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from planemesh.ebpf import egress_netlink
from planemesh.netplanes.htb_plan import EgressOp, EgressPlan
from planemesh.netplanes.netlink import ipr_or_new

TC_INGRESS_PARENT = 0xFFFFFFF2  # clsact ingress ("ffff:fff2")
TC_EGRESS_PARENT = 0xFFFFFFF3  # clsact egress ("ffff:fff3")
TC_CLSACT_HANDLE = 0xFFFF0000
TC_PRIO = 0x504D  # "PM": our slot on the ingress hook
TC_HANDLE = 0x1
ETH_P_ALL = 0x0003


def _has_clsact(ipr: IPRoute, ifindex: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex))


def _filters(ipr: IPRoute, ifindex: int, parent: int) -> list:
    try:
        return [f for f in ipr.get_filters(index=ifindex, parent=parent) if f.get_attr("TCA_KIND")]
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return []
        raise


def _ours(msg) -> bool:  # type: ignore[no-untyped-def]
    prio = (msg["info"] >> 16) & 0xFFFF
    return prio == TC_PRIO and msg.get_attr("TCA_KIND") == "bpf"


def ensure_clsact(ipr: IPRoute, ifindex: int) -> bool:
    """Make sure the interface has a clsact qdisc; True if this call created it."""
    if _has_clsact(ipr, ifindex):
        return False
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            return False
        raise
    return True


def attach_filter(ipr: IPRoute, ifindex: int, prog_fd: int, name: str) -> None:
    """Install (or atomically replace) our direct-action bpf filter on clsact ingress."""
    ipr.tc(
        "replace-filter",
        "bpf",
        ifindex,
        TC_HANDLE,
        fd=prog_fd,
        name=name,
        parent=TC_INGRESS_PARENT,
        prio=TC_PRIO,
        protocol=ETH_P_ALL,
        direct_action=True,
    )


def filter_attached(ipr: IPRoute, ifindex: int) -> bool:
    return any(_ours(f) for f in _filters(ipr, ifindex, TC_INGRESS_PARENT))


def detach_filter(ipr: IPRoute, ifindex: int) -> bool:
    """Remove our filter; True if there was one. A vanished interface counts as detached."""
    try:
        if not filter_attached(ipr, ifindex):
            return False
        ipr.tc(
            "del-filter", "bpf", ifindex, TC_HANDLE, parent=TC_INGRESS_PARENT, prio=TC_PRIO, protocol=ETH_P_ALL
        )
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return False
        raise
    return True


def remove_clsact_if_unused(ipr: IPRoute, ifindex: int) -> bool:
    """Delete the clsact qdisc if no filter is left on either hook; True if deleted."""
    try:
        if not _has_clsact(ipr, ifindex):
            return False
        if _filters(ipr, ifindex, TC_INGRESS_PARENT) or _filters(ipr, ifindex, TC_EGRESS_PARENT):
            return False
        ipr.tc("del", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            return False
        raise
    return True


class LocalTc:
    """TcHooks (ebpf/tc_hooks.py) run in this process through pyroute2, on `ipr` or a fresh IPRoute per call (in
    the calling thread's network namespace)."""

    def __init__(self, ipr: IPRoute | None = None) -> None:
        self._ipr = ipr

    def attach(self, ifindex: int, prog_fd: int, name: str) -> bool:
        with ipr_or_new(self._ipr) as nl:
            created = ensure_clsact(nl, ifindex)
            try:
                attach_filter(nl, ifindex, prog_fd, name)
            except Exception:
                if created:
                    remove_clsact_if_unused(nl, ifindex)
                raise
        return created

    def detach(self, ifindex: int, remove_clsact: bool) -> None:
        with ipr_or_new(self._ipr) as nl:
            detach_filter(nl, ifindex)
            if remove_clsact:
                remove_clsact_if_unused(nl, ifindex)

    def egress_apply(self, ifindex: int, plan: EgressPlan, prog_fd: int) -> list[EgressOp]:
        with ipr_or_new(self._ipr) as nl:
            return egress_netlink.apply_plan(nl, ifindex, plan, prog_fd)

    def egress_remove(self, ifindex: int) -> bool:
        with ipr_or_new(self._ipr) as nl:
            return egress_netlink.remove_plan(nl, ifindex)
