"""The agent's kernel side: the BPF data path and the policy routing it needs, driven by snapshots.

Every method runs on the agent's control thread (agent/control_thread.py), one at a time. Maps are written here
(bpf() syscalls); rules, routes and tc changes go through the short-lived netlink helper (netplanes/nl_client.py),
so pyroute2 is never imported in the agent; links are read from the agent's LinkMonitor (netplanes/link_monitor.py).
What was last applied is remembered: a snapshot that changes no rule and no HTB plan sends nothing to netlink.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from planemesh.ebpf import abi
from planemesh.model.config import Snapshot
from planemesh.netplanes.discovery import InterfaceDiff
from planemesh.netplanes.link_monitor import read_links
from planemesh.netplanes.nl_client import HelperTc, NetlinkHelper
from planemesh.netplanes.routing_plan import LocalDelivery, MarkRule, PlaneRouting

if TYPE_CHECKING:
    from planemesh.ebpf.egress_shaper import EgressShaper
    from planemesh.ebpf.loader import Datapath
    from planemesh.netplanes.htb_plan import EgressPlan

log = logging.getLogger("planemesh.kernel")


class KernelDataPath:
    own_mark = abi.PM_MARK_OWN  # SO_MARK of the proxy's upstream sockets: the program lets them pass
    local_mark = abi.PM_MARK_LOCAL

    def __init__(
        self,
        pin_dir: str | None = None,
        *,
        shape_egress: bool | None = None,
        uplinks: tuple[str, ...] = (),
        link_mbit: float | None = None,
    ) -> None:
        """shape_egress: per-plane HTB on every plane interface and on `uplinks` (interface names);
        None = only once some plane declares a bandwidth. link_mbit: the shaped links' rate."""
        self.pin_dir = pin_dir
        self.dp: Datapath | None = None
        self._routing_installed = False
        self.shape_egress = shape_egress
        self.uplinks = uplinks
        self.link_mbit = link_mbit
        self.shaper: EgressShaper | None = None
        self._egress_plan: EgressPlan | None = None
        self._plane_ifaces: set[int] = set()  # plane interfaces seen by sync_interfaces
        self.netlink = NetlinkHelper()  # pyroute2 in a child, only while changes are made
        self.link_lookup: Callable[[str], int | None] = _lookup_now  # the daemon's LinkMonitor.lookup once it runs
        self._rules: frozenset[MarkRule] | None = None  # plane rules last synced (None: not yet, sync)
        self._shaped: dict[int, EgressPlan] = {}  # ifindex -> HTB plan last applied there

    def open(self) -> None:
        from planemesh.ebpf.loader import Datapath

        tc = HelperTc(self.netlink)
        self.dp = Datapath(self.pin_dir, local_mark=self.local_mark, own_mark=self.own_mark, mark_planes=True, tc=tc)

    def _local_delivery(self) -> LocalDelivery:
        return LocalDelivery(mark=self.local_mark, mask=self.local_mark)

    def install_routing(self) -> None:
        for change in self.netlink.call("routing.install", self._local_delivery()):
            log.info("routing: %s", change)
        self._routing_installed = True

    def check(self, snap: Snapshot) -> None:
        """Raise ConfigError if the snapshot cannot be expressed in the data path (changes nothing)."""
        from planemesh.ebpf.policy import policy_from_snapshot
        from planemesh.model.config import ConfigError

        policy_from_snapshot(snap)
        self._plan_egress(snap)
        try:
            self._plane_routing().desired(snap.planes)
        except ValueError as exc:
            raise ConfigError("planes", str(exc)) from exc

    def apply(self, snap: Snapshot) -> None:
        from planemesh.ebpf.policy import policy_from_snapshot

        assert self.dp is not None
        result = self.dp.apply(policy_from_snapshot(snap))
        log.debug("policy sync: %s", result)
        # The proxy's own traffic of planes with a table is routed there (the multi-plane loop: docs/planes.md).
        self._sync_rules(self._plane_routing().desired(snap.planes))
        self._egress_plan = self._plan_egress(snap)
        self._shape(self._egress_targets())

    def _plane_routing(self) -> PlaneRouting:
        return PlaneRouting(own_mark=self.own_mark)

    def _sync_rules(self, desired: frozenset[MarkRule]) -> None:
        if desired == self._rules:
            return
        plan = self._plane_routing()
        for change in self.netlink.call("rules.sync", plan.own_mark, plan.priority, desired):
            log.info("plane routing: %s", change)
        self._rules = desired

    # ---- per-plane bandwidth (HTB on egress; see ebpf/egress_shaper.py) ----------------------------
    def _plan_egress(self, snap: Snapshot) -> EgressPlan | None:
        """The HTB plan for this snapshot, or None when shaping is off. Raises ConfigError."""
        from planemesh.netplanes.htb_plan import DEFAULT_LINK_MBIT, egress_plan

        wanted = self.shape_egress
        if wanted is None:
            wanted = any(p.sla.bandwidth_mbit is not None for p in snap.planes)
        if not wanted:
            return None
        return egress_plan(snap.planes, self.link_mbit or DEFAULT_LINK_MBIT)

    def _egress_targets(self) -> set[int]:
        targets = set(self._plane_ifaces)
        for name in self.uplinks:
            found = self.link_lookup(name)
            if found is not None:
                targets.add(found)
            else:
                log.warning("uplink %s not found: not shaped", name)
        return targets

    def _shape(self, ifindexes: set[int]) -> None:
        if self._egress_plan is None:
            if self.shaper is not None:  # shaping switched off: the interfaces get their default back
                self.shaper.close(remove=True)
                self.shaper = None
                self._shaped.clear()
            return
        if self.shaper is None:
            from planemesh.ebpf.egress_shaper import EgressShaper

            pin_dir = self.dp.pin_dir if self.dp is not None else None
            self.shaper = EgressShaper(pin_dir, tc=HelperTc(self.netlink))
        for ifindex in sorted(ifindexes):
            if self._shaped.get(ifindex) != self._egress_plan:  # unchanged: nothing to ask the kernel
                self.shaper.apply(ifindex, self._egress_plan)
                self._shaped[ifindex] = self._egress_plan

    def sync_interfaces(self, snap: Snapshot, change: InterfaceDiff) -> None:
        assert self.dp is not None
        plane_ids = {p.name: p.plane_id for p in snap.planes}
        for iface in change.removed:
            try:
                self.dp.detach(iface.ifindex)
            except Exception as exc:  # the interface may already be gone with its filters
                log.debug("detach %s: %s", iface.ifname, exc)
            self.dp.clear_interface(iface.ifindex)
            self._plane_ifaces.discard(iface.ifindex)
            self._shaped.pop(iface.ifindex, None)
            if self.shaper is not None:
                try:
                    self.shaper.remove(iface.ifindex)
                except Exception as exc:  # gone with the interface
                    log.debug("unshape %s: %s", iface.ifname, exc)
        for iface in (*change.added, *change.changed):
            # Map first, then attach: the program never sees an interface it cannot classify.
            self.dp.set_interface(iface.ifindex, plane_ids[iface.plane])
            if iface in change.added:
                self.dp.attach(iface.ifindex)
            self._plane_ifaces.add(iface.ifindex)
        if change.added:
            self._shape({iface.ifindex for iface in change.added})

    def counters(self) -> dict[tuple[int, int], tuple[int, int]]:
        return self.dp.counters() if self.dp is not None else {}

    def close(self, detach: bool = True) -> None:
        if self.shaper is not None:  # detach=False: the HTB and its filter keep shaping for the next agent
            self.shaper.close(remove=detach)
            self.shaper = None
        if self.dp is not None:
            self.dp.close(detach=detach)
            self.dp = None
        try:
            if detach:  # detach=False (fail-open, restart, hand-over): the rules keep routing for the next agent
                self._rules = None
                self._sync_rules(frozenset())
            if self._routing_installed and detach:
                for change in self.netlink.call("routing.remove", self._local_delivery()):
                    log.info("routing: %s", change)
                self._routing_installed = False
        finally:
            self.netlink.close()


def _lookup_now(ifname: str) -> int | None:
    """An interface's index by name, read now (without a LinkMonitor)."""
    return next((link.ifindex for link in read_links() if link.ifname == ifname), None)
