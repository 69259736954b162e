"""Per-plane CPU groups with the real agent: each plane's workers sit in their own cgroup carrying the
plane's sla.cpu_weight, a live weight change is applied, and the groups are gone after the agent stops."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from planemesh.agent.cpu_groups import V1_SHARES_PER_WEIGHT
from planemesh.agent.static_config import default_config_text
from tests.netns.agent_lab import eventually, running_agent

pytestmark = pytest.mark.netns


def _config(path: Path, weights: dict[str, int]) -> Path:
    raw = yaml.safe_load(default_config_text())
    for plane in raw["planes"]:
        plane["sla"] = {**plane.get("sla", {}), "cpu_weight": weights[plane["name"]]}
    path.write_text(yaml.safe_dump(raw))
    return path


def _workers_of(agent_pid: int) -> dict[str, int]:
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and b"planemesh.agent.worker" in argv:
            found[argv[argv.index(b"--plane") + 1].decode()] = int(proc.name)
    return found


def _cpu_group(pid: int) -> Path:
    """The directory of the cgroup that decides `pid`'s CPU share (v2 if it has the cpu controller, else v1)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    for _, mount, fstype, options, *_ in mounts:
        if fstype == "cgroup" and "cpu" in options.split(","):
            rel = next(p for h, c, p in (x.split(":", 2) for x in lines) if "cpu" in c.split(","))
            return Path(mount) / rel.lstrip("/")
    mount = next(m[1] for m in mounts if m[2] == "cgroup2")
    rel = next(p for h, _c, p in (x.split(":", 2) for x in lines) if h == "0")
    return Path(mount) / rel.lstrip("/")


def _weight(group: Path) -> int:
    if (group / "cpu.weight").exists():
        return int((group / "cpu.weight").read_text())
    return round(int((group / "cpu.shares").read_text()) / V1_SHARES_PER_WEIGHT)


def test_each_plane_gets_its_weighted_cpu_group(run_prefix: str, tmp_path: Path) -> None:
    config = _config(tmp_path / "agent.yaml", {"oam": 800, "media": 50})
    with running_agent(run_prefix, ["--config", str(config)]) as env:
        workers = eventually(lambda: (w := _workers_of(env.agent.pid)) and len(w) == 2 and w, timeout=10)
        groups = {plane: _cpu_group(pid) for plane, pid in workers.items()}
        assert groups["oam"].name == "plane-oam" and groups["media"].name == "plane-media"
        assert groups["oam"].parent == groups["media"].parent  # one agent instance, one parent
        assert _weight(groups["oam"]) == 800 and _weight(groups["media"]) == 50
        assert _weight(groups["oam"].parent) == 200  # two workers: the agent takes what they would ungrouped

        _config(config, {"oam": 800, "media": 200})
        env.agent.send_signal(1)  # SIGHUP: reload, the weight changes in place, workers keep running
        eventually(lambda: _weight(groups["media"]) == 200, timeout=10)
        assert _workers_of(env.agent.pid) == workers
        parent = groups["oam"].parent
    assert not parent.exists(), "the agent's CPU groups outlive it"
