"""The agent's kernel side: the BPF data path and the policy routing it needs, driven by snapshots.

Every method runs on the agent's control thread (agent/control_thread.py), one at a time.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from planemesh.agent.config import Snapshot
from planemesh.ebpf import abi
from planemesh.netplanes.discovery import InterfaceDiff

if TYPE_CHECKING:
    from planemesh.ebpf.loader import Datapath

log = logging.getLogger("planemesh.kernel")


class KernelDataPath:
    own_mark = abi.PM_MARK_OWN  # SO_MARK of the proxy's upstream sockets: the program lets them pass
    local_mark = abi.PM_MARK_LOCAL

    def __init__(self, pin_dir: str | None = None) -> None:
        self.pin_dir = pin_dir
        self.dp: Datapath | None = None
        self._routing_installed = False

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

        policy_from_snapshot(snap)

    def apply(self, snap: Snapshot) -> None:
        from planemesh.ebpf.policy import policy_from_snapshot

        assert self.dp is not None
        result = self.dp.apply(policy_from_snapshot(snap))
        log.debug("policy sync: %s", result)

    def sync_interfaces(self, snap: Snapshot, change: InterfaceDiff) -> None:
        assert self.dp is not None
        plane_ids = {p.name: p.plane_id for p in snap.planes}
        for iface in change.removed:
            try:
                self.dp.detach(iface.ifindex)
            except Exception as exc:  # the interface may already be gone with its filters
                log.debug("detach %s: %s", iface.ifname, exc)
            self.dp.clear_interface(iface.ifindex)
        for iface in (*change.added, *change.changed):
            # Map first, then attach: the program never sees an interface it cannot classify.
            self.dp.set_interface(iface.ifindex, plane_ids[iface.plane])
            if iface in change.added:
                self.dp.attach(iface.ifindex)

    def counters(self) -> dict[tuple[int, int], tuple[int, int]]:
        return self.dp.counters() if self.dp is not None else {}

    def close(self, detach: bool = True) -> None:
        if self.dp is not None:
            self.dp.close(detach=detach)
            self.dp = None
        if self._routing_installed and detach:
            from planemesh.netplanes import routing

            routing.remove(routing.LocalDelivery(mark=self.local_mark, mask=self.local_mark))
            self._routing_installed = False
