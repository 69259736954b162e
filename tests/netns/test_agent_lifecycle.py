"""The agent changes only what it owns, never uses iptables/nftables, and leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from planemesh.agent.demo import start_agent, start_servers
from planemesh.labs import load_lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import http_requests

pytestmark = pytest.mark.netns
FIREWALL_DUMPS = (["iptables-save"], ["ip6tables-save"], ["nft", "list", "ruleset"])


def firewall_state(ns: str | None) -> dict[str, str]:
    """Every iptables/ip6tables/nft rule visible in `ns` (or this namespace), minus comments."""
    state = {}
    for argv in FIREWALL_DUMPS:
        assert shutil.which(argv[0]), f"{argv[0]} must be installed for this check (scripts/setup.sh does it)"
        full = ns_tools.exec_argv(ns, argv) if ns else argv
        out = subprocess.run(full, capture_output=True, text=True, timeout=20).stdout
        state[argv[0]] = "\n".join(ln for ln in out.splitlines() if ln.strip() and not ln.startswith("#"))
    return state


def node_kernel_state(ns: str) -> dict[str, str]:
    def ip(*args: str) -> str:
        return ns_tools.run(ns, ["ip", *args]).stdout

    tc = "".join(
        ns_tools.run(ns, ["tc", "filter", "show", "dev", dev, "ingress"]).stdout
        + ns_tools.run(ns, ["tc", "qdisc", "show", "dev", dev]).stdout
        for dev in ("client-oam", "client-media", "server-oam", "server-media")
    )
    return {
        "rules4": ip("-4", "rule", "show"),
        "rules6": ip("-6", "rule", "show"),
        "routes": ip("route", "show", "table", "all") + ip("-6", "route", "show", "table", "all"),
        "tc": tc,
    }


def host_state() -> dict[str, object]:
    return {
        "links": subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout,
        "rules": subprocess.run(["ip", "rule", "show"], capture_output=True, text=True).stdout,
        "bpffs": sorted(os.listdir("/sys/fs/bpf")) if os.path.isdir("/sys/fs/bpf") else [],
        "firewall": firewall_state(None),
    }


def test_full_lifecycle_uses_no_firewall_and_leaves_nothing(run_prefix: str, tmp_path: Path) -> None:
    host_before = host_state()
    lab = load_lab(prefix=f"{run_prefix}f")
    with lab:
        servers = start_servers(lab)
        node_before = node_kernel_state(lab.node_ns)
        fw_before = firewall_state(lab.node_ns)
        assert all(not rules for rules in fw_before.values()), fw_before
        agent = start_agent(lab, tmp_path)
        try:
            during = node_kernel_state(lab.node_ns)
            assert "pm_tc_ingress" in during["tc"], "the program is attached on the plane interfaces"
            assert "fwmark" in during["rules4"] and "fwmark" in during["rules6"]
            ok = http_requests(lab.pod_ns("client"), lab.pod_addr("server", "oam", 6), 80, ["/"])
            assert ok.status == [200]
            assert firewall_state(lab.node_ns) == fw_before, "no iptables/nftables rule while running"
            assert firewall_state(None) == host_before["firewall"]
        finally:
            assert ns_tools.stop(agent) == 0, "\n".join(getattr(agent, "output_lines", []))
            for proc in servers:
                ns_tools.stop(proc)
        after = node_kernel_state(lab.node_ns)
        assert after == node_before, "the agent removed its filters, qdiscs, rules and routes"
        assert firewall_state(lab.node_ns) == fw_before
    assert lab.existing() == []
    assert host_state() == host_before, "the machine's own namespace and bpffs are as they were"


def test_bad_agent_config_is_one_clear_line_and_changes_nothing(run_prefix: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "planes:\n"
        "  - {name: oam, id: 1, interfaces: ['*-oam'], cidrs: [198.18.1.0/24, 'fd00:18:1::/129']}\n"
        "listeners: []\n"
    )
    lab = load_lab(prefix=f"{run_prefix}b")
    with lab:
        before = node_kernel_state(lab.node_ns)
        proc = subprocess.run(
            [sys.executable, "-m", "planemesh.agent.cli", "agent", "--netns", lab.node_ns, "--config", str(bad),
             "--admin", f"unix://{tmp_path / 'admin.sock'}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert lines == ["planemesh: config error: planes[0].cidrs[1]: 'fd00:18:1::/129' is not a valid CIDR"]
        assert node_kernel_state(lab.node_ns) == before
