"""The systemd unit: it verifies, its hardening score is the one documented, and its capability set is
both sufficient and minimal for what the agent does to the kernel (checked for real with setpriv)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "planemesh-agent.service"
INSTALL = REPO / "systemd" / "install.sh"
DOCS = REPO / "docs" / "operations.md"
PROBE = Path(__file__).with_name("caps_probe.py")
UNIT_CAPS = ("CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON")

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def installed(tmp_path) -> Path:
    """install.sh into a staging root, ExecStart pointing at a binary that exists here."""
    binary = shutil.which("planemesh") or str(Path(sys.executable).with_name("planemesh"))
    if not os.path.exists(binary):
        binary = sys.executable  # verify only checks that ExecStart's program exists
    env = {**os.environ, "ROOT": str(tmp_path), "PLANEMESH_BIN": binary}
    subprocess.run(["sh", str(INSTALL)], env=env, check=True, capture_output=True, timeout=30)
    return tmp_path


def test_install_writes_unit_env_and_keeps_operator_files(installed):
    unit = installed / "etc/systemd/system/planemesh-agent.service"
    env_file = installed / "etc/planemesh/planemesh.env"
    exec_start = _directives(unit.read_text())["ExecStart"][0]
    assert exec_start.endswith(" agent --bootstrap /etc/planemesh/bootstrap.yaml")
    assert os.path.isabs(exec_start.split()[0]) and os.path.exists(exec_start.split()[0])
    env_file.write_text("PLANEMESH_LOG_LEVEL=debug\n")  # the operator's edit survives a re-install
    env = {**os.environ, "ROOT": str(installed), "PLANEMESH_BIN": "/opt/pm/bin/planemesh"}
    subprocess.run(["sh", str(INSTALL)], env=env, check=True, capture_output=True, timeout=30)
    assert env_file.read_text() == "PLANEMESH_LOG_LEVEL=debug\n"
    assert _directives(unit.read_text())["ExecStart"][0].startswith("/opt/pm/bin/planemesh agent ")
    bad = subprocess.run(["sh", str(INSTALL)], env={**env, "PLANEMESH_BIN": "planemesh"}, capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert bad.returncode == 2 and "absolute path" in bad.stderr


def test_unit_contract():
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"] and d["Restart"] == ["on-failure"]
    assert int(d["WatchdogSec"][0]) > 0
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["CapabilityBoundingSet"] == d["AmbientCapabilities"] == [" ".join(UNIT_CAPS)]
    assert d["ProtectSystem"] == ["strict"]
    # bpffs, the runtime dir, and our own delegated cgroup (per-plane worker groups), nothing else
    assert d["ReadWritePaths"] == ["/sys/fs/bpf /run/planemesh", "-/sys/fs/cgroup/system.slice/planemesh-agent.service"]
    assert d["Delegate"] == ["cpu cpuset memory"]  # per-plane weight, cpuset and memory limits
    assert d["RuntimeDirectory"] == ["planemesh"] and d["PrivateTmp"] == ["yes"] and d["NoNewPrivileges"] == ["yes"]
    assert d["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert "MemoryDenyWriteExecute" not in d and "PrivateBPF" not in d  # break bcc / hide our pins
    assert any("bpf" in f.split() for f in d["SystemCallFilter"])


@needs_systemd_analyze
def test_systemd_analyze_verify(installed):
    unit = installed / "etc/systemd/system/planemesh-agent.service"
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    problems = [line for line in result.stderr.splitlines() if "planemesh-agent.service" in line]
    assert result.returncode == 0 and problems == [], result.stderr


@needs_systemd_analyze
def test_security_exposure_matches_the_documented_score(installed):
    unit = installed / "etc/systemd/system/planemesh-agent.service"
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    match = re.search(r"Overall exposure level for planemesh-agent.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    score = float(match.group(1))
    assert score <= 3.0  # "OK" or better: the bar for an agent that must hold CAP_BPF and CAP_NET_ADMIN
    documented = re.search(r"exposure level \*\*(\d+\.\d)\*\*", DOCS.read_text())
    assert documented and float(documented.group(1)) == score


def _probe(netns: str, caps: tuple[str, ...]) -> dict[str, str]:
    bounding = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in caps)])
    cmd = ["ip", "netns", "exec", netns, "setpriv", f"--bounding-set={bounding}", "--inh-caps=-all",
           sys.executable, str(PROBE), "pmc0"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.parametrize("dropped", [None, *UNIT_CAPS])
def test_unit_capabilities_are_sufficient_and_each_one_is_needed(run_prefix, dropped):
    """The agent's kernel operations under exactly the unit's capabilities, then with each one removed."""
    netns = f"{run_prefix}-caps"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", netns, "link", "add", "pmc0", "type", "veth", "peer", "name", "pmc1"],
                       check=True, timeout=10)  # fmt: skip
        subprocess.run(["ip", "-n", netns, "link", "set", "pmc0", "up"], check=True, timeout=10)
        steps = _probe(netns, tuple(c for c in UNIT_CAPS if c != dropped))
    finally:
        subprocess.run(["ip", "netns", "del", netns], timeout=10)
    results = {k: v for k, v in steps.items() if k != "cap_eff"}
    if dropped is None:
        assert set(results.values()) == {"ok"}, results
        assert set(results) == {"bpf_load", "tc_attach", "map_update", "fwmark_rule", "local_route",
                                "ip_transparent", "so_mark"}  # fmt: skip
    elif dropped == "CAP_NET_ADMIN":
        assert results["fwmark_rule"] != "ok" and results["so_mark"] != "ok" and results["bpf_load"] != "ok"
    else:  # CAP_BPF or CAP_PERFMON: the program does not load
        assert results["bpf_load"] != "ok", results
