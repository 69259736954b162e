"""The agent's kernel side without pyroute2 in its process (issue 15): KernelDataPath in a fresh interpreter in a
lab node installs local delivery, a plane's fwmark rule, the ingress filters and the HTB through the short-lived
netlink helper (netplanes/nl_helper.py), never imports pyroute2 itself, asks nothing of netlink for an unchanged
snapshot, lets the helper exit once idle (the kernel state stays) and removes everything at close. The kernel
state is checked from this process with pyroute2."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from planemesh.ebpf import tc_attach
from planemesh.ebpf.egress_netlink import observe
from planemesh.labs import netns as ns_tools
from planemesh.labs.netns import call_in
from planemesh.netplanes import routing

pytestmark = [pytest.mark.bpf, pytest.mark.netns]
TABLE = 120

SNAPSHOT = {
    "planes": [
        {"name": "oam", "id": 1, "interfaces": ["*-oam"], "cidrs": ["198.18.1.0/24"], "table": TABLE,
         "sla": {"bandwidth_mbit": 30, "priority": 1}},
        {"name": "media", "id": 2, "interfaces": ["*-media"], "cidrs": ["198.18.2.0/24"], "proxy_port": 15011,
         "sniff_port": 15012},
    ],
    "listeners": [],
}  # fmt: skip

SCRIPT = """
import json, sys
from planemesh.agent.kernel import KernelDataPath
from planemesh.model.static_config import snapshot_from_dict
from planemesh.netplanes import discovery

def report(**more):
    print(json.dumps({"pyroute2": any(m.split(".")[0] == "pyroute2" for m in sys.modules), **more}), flush=True)

snap = snapshot_from_dict(json.loads(sys.argv[1]))
k = KernelDataPath()
k.netlink.linger_s = float(sys.argv[2])
k.open()
k.install_routing()
k.apply(snap)
k.sync_interfaces(snap, discovery.diff({}, discovery.scan(snap.planes)))
calls = k.netlink.calls
k.apply(snap)  # the same snapshot again
report(calls=calls, calls_again=k.netlink.calls, starts=k.netlink.starts, helper=k.netlink.pid)
sys.stdin.readline()
k.close()
report(helper=k.netlink.pid)
"""


def _state(ifnames: list[str]) -> dict[str, object]:
    from planemesh.netplanes.routing import PlaneRouting

    with IPRoute() as ipr:
        index = {name: ipr.link_lookup(ifname=name)[0] for name in ifnames}
        return {
            "local": routing.installed(routing.LocalDelivery(), ipr),
            "tables": sorted(rule.table for rule in PlaneRouting().observed(ipr)),
            "filters": {name: tc_attach.filter_attached(ipr, i) for name, i in index.items()},
            "htb": {name: observe(ipr, i).ours for name, i in index.items()},
        }


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kernel_changes_go_through_a_helper_that_exits_when_idle(lab) -> None:
    argv = [sys.executable, "-P", "-c", SCRIPT, json.dumps(SNAPSHOT), "1.0"]
    proc = ns_tools.popen(lab.node_ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    names = ["client-oam", "client-media", "server-oam", "server-media"]
    try:
        applied = json.loads(proc.stdout.readline())
        assert applied["pyroute2"] is False, "pyroute2 was imported by the agent's process"
        assert applied["calls"] > 0 and applied["calls_again"] == applied["calls"], applied  # unchanged: no netlink
        assert applied["starts"] >= 1 and applied["helper"] is not None  # more: a BPF compile outlasted the linger
        state = call_in(lab.node_ns, _state, names)
        assert state["local"] is True
        assert state["tables"] == [TABLE]  # oam's rule, v4 only (its CIDRs are v4)
        assert state["filters"] == dict.fromkeys(names, True)
        assert state["htb"] == dict.fromkeys(names, True)
        deadline = time.monotonic() + 10
        while _alive(applied["helper"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(applied["helper"]), "the idle helper did not exit"
        assert call_in(lab.node_ns, _state, names) == state  # what it did stays

        proc.stdin.write("\n")
        proc.stdin.flush()
        closed = json.loads(proc.stdout.readline())
        assert closed == {"pyroute2": False, "helper": None}
        assert proc.wait(30) == 0
        after = call_in(lab.node_ns, _state, names)
        assert after == {
            "local": False,
            "tables": [],
            "filters": dict.fromkeys(names, False),
            "htb": dict.fromkeys(names, False),
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
