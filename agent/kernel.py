"""The agent's kernel side: the BPF data path and the policy routing it needs, driven by snapshots.

Every method runs on the agent's control thread (agent/control_thread.py), one at a time.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from planemesh.ebpf import abi
from planemesh.model.config import Snapshot
from planemesh.netplanes.discovery import InterfaceDiff

if TYPE_CHECKING:
    from planemesh.ebpf.egress_shaper import EgressShaper
    from planemesh.ebpf.loader import Datapath
    from planemesh.netplanes.htb_plan import EgressPlan
    from planemesh.netplanes.routing import PlaneRouting

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

    def open(self) -> None:
        from planemesh.ebpf.loader import Datapath

        self.dp = Datapath(self.pin_dir, local_mark=self.local_mark, own_mark=self.own_mark, mark_planes=True)

    def install_routing(self) -> None:
        from planemesh.netplanes import routing

        routing.install(routing.LocalDelivery(mark=self.local_mark, mask=self.local_mark))
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
        for change in self._plane_routing().sync(snap.planes):
            log.info("plane routing: %s", change)
        self._egress_plan = self._plan_egress(snap)
        self._shape(self._egress_targets())

    def _plane_routing(self) -> PlaneRouting:
        from planemesh.netplanes.routing import PlaneRouting

        return PlaneRouting(own_mark=self.own_mark)

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
        if self.uplinks:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                for name in self.uplinks:
                    found = ipr.link_lookup(ifname=name)
                    if found:
                        targets.add(found[0])
                    else:
                        log.warning("uplink %s not found: not shaped", name)
        return targets

    def _shape(self, ifindexes: set[int]) -> None:
        if self._egress_plan is None:
            if self.shaper is not None:  # shaping switched off: the interfaces get their default back
                self.shaper.close(remove=True)
                self.shaper = None
            return
        if self.shaper is None:
            from planemesh.ebpf.egress_shaper import EgressShaper

            self.shaper = EgressShaper(self.dp.pin_dir if self.dp is not None else None)
        for ifindex in sorted(ifindexes):
            self.shaper.apply(ifindex, self._egress_plan)

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
        if detach:  # detach=False (fail-open, restart, hand-over): the rules keep routing for the next agent
            for change in self._plane_routing().remove():
                log.info("plane routing: %s", change)
        if self._routing_installed and detach:
            from planemesh.netplanes import routing

            routing.remove(routing.LocalDelivery(mark=self.local_mark, mask=self.local_mark))
            self._routing_installed = False
