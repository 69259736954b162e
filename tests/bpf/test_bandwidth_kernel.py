"""KernelDataPath wires per-plane HTB: every plane interface of a lab node gets the tree once a plane
declares a bandwidth, a new snapshot changes only the class it changes, close() restores the interfaces."""

from __future__ import annotations

import pytest
from pyroute2 import IPRoute

from planemesh.agent.kernel import KernelDataPath
from planemesh.ebpf import abi
from planemesh.ebpf.egress_netlink import observe
from planemesh.labs.netns import call_in
from planemesh.model.static_config import snapshot_from_dict
from planemesh.netplanes import discovery
from planemesh.netplanes.htb_plan import mbit_to_bytes

pytestmark = [pytest.mark.bpf, pytest.mark.netns]


def _snapshot(oam_mbit: float | None):  # type: ignore[no-untyped-def]
    sla = {"priority": 1} if oam_mbit is None else {"bandwidth_mbit": oam_mbit, "priority": 1}
    return snapshot_from_dict(
        {
            "planes": [
                {"name": "oam", "id": 1, "interfaces": ["*-oam"], "cidrs": ["198.18.1.0/24"], "sla": sla},
                {
                    "name": "media",
                    "id": 2,
                    "interfaces": ["*-media"],
                    "cidrs": ["198.18.2.0/24"],
                    "proxy_port": 15011,
                    "sniff_port": 15012,
                },
            ],
            "listeners": [],
        }
    )


def _trees() -> dict[str, object]:
    with IPRoute() as ipr:
        links = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return {name: observe(ipr, idx) for idx, name in links.items() if name != "lo"}


def _sync(kernel: KernelDataPath, snap) -> None:  # type: ignore[no-untyped-def]
    kernel.apply(snap)
    kernel.sync_interfaces(snap, discovery.diff({}, discovery.scan(snap.planes)))


def test_kernel_shapes_plane_interfaces_and_restores_them(lab) -> None:
    node = lab.node_ns
    kernel = KernelDataPath()
    try:
        call_in(node, kernel.open)
        call_in(node, _sync, kernel, _snapshot(None))
        assert not any(t.ours for t in call_in(node, _trees).values())  # no bandwidth anywhere: no HTB

        call_in(node, kernel.apply, _snapshot(30))
        trees = call_in(node, _trees)
        assert set(trees) == {"client-oam", "client-media", "server-oam", "server-media"}
        for tree in trees.values():
            assert tree.ours
            assert tree.classes[abi.plane_classid(1)].rate == mbit_to_bytes(30)
            assert tree.classes[abi.plane_classid(2)].ceil == tree.classes[abi.htb_classid(1)].ceil

        call_in(node, kernel.apply, _snapshot(20))
        for tree in call_in(node, _trees).values():
            assert tree.classes[abi.plane_classid(1)].rate == mbit_to_bytes(20)
    finally:
        call_in(node, kernel.close)
    assert not any(t.ours for t in call_in(node, _trees).values())
