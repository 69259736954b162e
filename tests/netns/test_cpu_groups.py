"""Per-plane worker groups with the real agent: each plane's workers sit in their own cgroup carrying the
plane's sla.cpu_weight, sla.cpus (cpuset) and sla.memory_max_mb (memory.max/high); live changes are applied, a
bad cpuset is refused naming the field (static config, SIGHUP, xDS listener metadata), the limits follow a hot
upgrade to the successor's groups, and the groups are gone after the agent stops."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from planemesh.agent.cpu_groups import V1_SHARES_PER_WEIGHT
from planemesh.agent.demo import default_xds_resources, start_agent
from planemesh.labs import netns as ns_tools
from planemesh.labs import procs
from planemesh.model.plane_limits import parse_cpu_list
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import eventually, running_agent

pytestmark = pytest.mark.netns


def _config(path: Path, weights: dict[str, int]) -> Path:
    raw = yaml.safe_load(default_config_text())
    for plane in raw["planes"]:
        plane["sla"] = {**plane.get("sla", {}), "cpu_weight": weights[plane["name"]]}
    path.write_text(yaml.safe_dump(raw))
    return path


def _workers_of(agent_pid: int) -> dict[str, int]:
    return {plane: pids[0] for plane, pids in _worker_pids(agent_pid).items()}


def _worker_pids(agent_pid: int) -> dict[str, list[int]]:
    """Plane -> the agent's workers, exec'd or forked by its zygote (labs/procs.py)."""
    return procs.workers_by_plane(agent_pid)


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


# ---- cpusets and memory limits ---------------------------------------------------------------------------

MIB = 1 << 20
ONLINE = parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text())
FIRST, LAST = min(ONLINE), max(ONLINE)  # on a one-CPU node both are 0: the files are still checked


def _group(pid: int, controller: str) -> Path:
    """The directory of the cgroup that applies `controller` to `pid` (its v1 hierarchy, else cgroup v2)."""
    lines = [x.split(":", 2) for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    for _, mount, fstype, options, *_ in (m.split() for m in Path("/proc/self/mounts").read_text().splitlines()):
        if fstype == "cgroup" and controller in options.split(","):
            return Path(mount) / next(p for _h, c, p in lines if controller in c.split(",")).lstrip("/")
    mount = next(m.split()[1] for m in Path("/proc/self/mounts").read_text().splitlines() if m.split()[2] == "cgroup2")
    return Path(mount) / next(p for h, _c, p in lines if h == "0").lstrip("/")


def _read(group: Path, v2: str, v1: str) -> str:
    return ((group / v2) if (group / v2).exists() else (group / v1)).read_text().strip()


def _memory(group: Path) -> tuple[int, int]:
    """(memory.max, memory.high) of a group; v1: memory.limit_in_bytes and memory.soft_limit_in_bytes."""
    return int(_read(group, "memory.max", "memory.limit_in_bytes")), int(
        _read(group, "memory.high", "memory.soft_limit_in_bytes")
    )


def _allowed_cpus(pid: int) -> frozenset[int]:
    """What the scheduler lets the process run on: the proof that it is confined, whatever the files say."""
    status = Path(f"/proc/{pid}/status").read_text()
    return parse_cpu_list(next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list:")).split(":")[1])


def _limits_config(path: Path, oam: dict, media: dict | None = None) -> Path:
    raw = yaml.safe_load(default_config_text())
    for plane in raw["planes"]:
        plane["sla"] = {**plane.get("sla", {}), **(oam if plane["name"] == "oam" else media or {})}
    path.write_text(yaml.safe_dump(raw))
    return path


def _check_oam_confined(agent_pid: int, cpus: int, workers: int, cap_mb: int) -> list[int]:
    def running() -> list[int]:
        pids = _worker_pids(agent_pid).get("oam", [])
        return pids if len(pids) == workers else []

    def pinned(pid: int) -> bool:
        return parse_cpu_list(_read(_group(pid, "cpuset"), "cpuset.cpus", "cpuset.cpus")) == {cpus}

    pids = eventually(running)
    assert pids, f"oam should run {workers} workers"
    eventually(lambda: all(pinned(pid) for pid in pids))  # after a SIGHUP or an xDS update: applied shortly
    for pid in pids:
        cpuset, memory = _group(pid, "cpuset"), _group(pid, "memory")
        assert cpuset.name == "plane-oam" and cpuset.parent.name == f"planemesh-{agent_pid}"
        assert memory.name == "plane-oam" and memory.parent.name == f"planemesh-{agent_pid}"
        assert parse_cpu_list(_read(cpuset, "cpuset.cpus", "cpuset.cpus")) == {cpus}
        assert str(pid) in (cpuset / "cgroup.procs").read_text().split()
        assert str(pid) in (memory / "cgroup.procs").read_text().split()
        # the plane's workers' caps plus a quarter (at least 32 MiB) each; memory.high at 90%
        limit_mb = workers * (cap_mb + max(32, cap_mb // 4))
        assert _memory(memory) == (limit_mb * MIB, limit_mb * 9 // 10 * MIB)
        assert eventually(lambda pid=pid: _allowed_cpus(pid) == {cpus}), _allowed_cpus(pid)
    return pids


def _bases(agent_pid: int, pid: int) -> list[Path]:
    """The agent's own groups (planemesh-<pid>) in every hierarchy `pid`'s cpu, cpuset and memory use."""
    return [_group(pid, c).parent for c in ("cpu", "cpuset", "memory")]


def test_cpuset_and_memory_limits_confine_the_planes_workers(run_prefix: str, tmp_path: Path) -> None:
    config = _limits_config(tmp_path / "agent.yaml", {"cpus": str(LAST), "memory_max_mb": 128, "workers": 2})
    with running_agent(run_prefix, ["--config", str(config)]) as env:
        agent = env.agent.pid
        oam = _check_oam_confined(agent, LAST, workers=2, cap_mb=128)
        media = _worker_pids(agent)["media"][0]
        assert _group(media, "cpuset").name == "plane-media" and _allowed_cpus(media) == ONLINE  # no cpuset asked
        assert _memory(_group(media, "memory"))[0] == (256 + 64) * MIB  # the default cap
        bases = _bases(agent, oam[0])

        # Visible in the stats: the limits in force, nothing missing; the Prometheus gauge says 1.
        rows = eventually(lambda: {r["plane"]: r for r in env.admin.get_json("/stats?format=json")[1]["plane_groups"]})
        assert rows["oam"]["cpus_effective"] == str(LAST) and rows["oam"]["not_applied"] == {}
        assert rows["oam"]["memory_max_bytes"] == 2 * 160 * MIB
        metrics = env.admin.get("/stats").body.decode()
        assert 'planemesh_plane_limit_applied{limit="cpuset",plane="oam"} 1.0' in metrics

        # SIGHUP: the cpuset moves in place, the same workers follow it.
        _limits_config(config, {"cpus": str(FIRST), "memory_max_mb": 128, "workers": 2})
        env.agent.send_signal(signal.SIGHUP)
        assert _check_oam_confined(agent, FIRST, workers=2, cap_mb=128) == oam

        # SIGHUP with a CPU that is not online: refused naming the field, the running limits stay.
        _limits_config(config, {"cpus": f"{FIRST},{LAST + 1}", "memory_max_mb": 128, "workers": 2})
        env.agent.send_signal(signal.SIGHUP)
        refused = eventually(lambda: [x for x in env.agent_output().splitlines() if "keeping the running" in x])
        assert refused and "planes[0].sla.cpus" in refused[0] and f"CPU {LAST + 1} not online" in refused[0]
        assert _check_oam_confined(agent, FIRST, workers=2, cap_mb=128) == oam
    assert not any(base.exists() for base in bases), "the agent's limits outlive it"


def test_a_bad_cpuset_in_the_static_config_is_refused_naming_it(run_prefix: str, tmp_path: Path) -> None:
    config = _limits_config(tmp_path / "agent.yaml", {}, {"cpus": "0-"})
    with pytest.raises(RuntimeError) as err, running_agent(f"{run_prefix}b", ["--config", str(config)]):
        pass
    assert "planes[1].sla.cpus" in str(err.value) and "not a CPU number or range" in str(err.value)


def _xds_dir(path: Path, cpus: str) -> Path:
    """The default xDS resources with `planemesh.sla.cpus` on the 0.0.0.0:8080 listener (every plane)."""
    docs = yaml.safe_load((default_xds_resources() / "default.yaml").read_text())
    for doc in docs:
        if doc.get("name") == "http_8080":
            doc["metadata"] = {"filter_metadata": {"planemesh": {"sla": {"cpus": cpus, "memory_max_mb": 96}}}}
    path.mkdir(exist_ok=True)
    (path / "default.yaml").write_text(yaml.safe_dump(docs))
    return path


def test_cpuset_from_xds_listener_metadata_and_a_bad_one_nacked(run_prefix: str, tmp_path: Path) -> None:
    resources = _xds_dir(tmp_path / "xds", str(LAST))
    with running_agent(f"{run_prefix}x", ["--xds-resources", str(resources)]) as env:
        oam = _check_oam_confined(env.agent.pid, LAST, workers=1, cap_mb=96)
        _xds_dir(resources, f"{LAST}-{LAST + 1}")  # the embedded server polls the directory
        nack = eventually(lambda: [x for x in env.agent_output().splitlines() if "NACKed LDS" in x], timeout=15)
        assert nack, env.agent_output()
        assert "listener[http_8080].metadata.planemesh.sla.cpus" in nack[0] and "not online" in nack[0]
        assert _check_oam_confined(env.agent.pid, LAST, workers=1, cap_mb=96) == oam


def test_limits_follow_a_hot_upgrade_to_the_successors_groups(run_prefix: str, tmp_path: Path) -> None:
    config = _limits_config(tmp_path / "agent.yaml", {"cpus": str(LAST), "memory_max_mb": 128})
    with running_agent(f"{run_prefix}h", ["--config", str(config)]) as env:
        old = env.agent.pid
        old_bases = _bases(old, _check_oam_confined(old, LAST, workers=1, cap_mb=128)[0])
        successor = start_agent(env.lab, tmp_path, ["--config", str(config)])
        try:
            assert env.agent.wait(30) == 0, env.agent_output()
            assert "left to the successor" in env.agent_output()
            new = _check_oam_confined(successor.pid, LAST, workers=1, cap_mb=128)
            assert not any(base.exists() for base in old_bases), "the predecessor's groups outlive it"
            new_bases = _bases(successor.pid, new[0])
            assert all(base.name == f"planemesh-{successor.pid}" for base in new_bases)
        finally:
            assert ns_tools.stop(successor) == 0
        assert not any(base.exists() for base in new_bases), "the successor's groups outlive it"


def test_groups_of_a_killed_agent_are_removed_by_the_next(run_prefix: str, tmp_path: Path) -> None:
    config = _limits_config(tmp_path / "agent.yaml", {"cpus": str(LAST), "memory_max_mb": 128})
    with running_agent(f"{run_prefix}k", ["--config", str(config)]) as env:
        killed = env.agent.pid
        pids = _check_oam_confined(killed, LAST, workers=1, cap_mb=128)
        stale = _bases(killed, pids[0])
        env.agent.kill()  # SIGKILL: no cleanup; the workers die with it (PR_SET_PDEATHSIG)
        env.agent.wait(10)
        assert eventually(lambda: not _worker_pids(killed) and not any(Path(f"/proc/{p}").exists() for p in pids))
        assert all(base.exists() for base in stale)
        successor = start_agent(env.lab, tmp_path, ["--config", str(config)])
        try:
            _check_oam_confined(successor.pid, LAST, workers=1, cap_mb=128)
            assert not any(base.exists() for base in stale), "a dead agent's groups stay"
        finally:
            assert ns_tools.stop(successor) == 0


def _anon_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("RssAnon:")).split()[1]) * 1024


def test_a_worker_is_in_its_groups_from_its_first_instruction(run_prefix: str, tmp_path: Path) -> None:
    """The worker's start-up memory (interpreter, imports: ~30 MB) is charged to its plane's memory group, not
    left in the agent's: the worker joins its groups before it execs, not after it reports ready. Exec'd workers
    (--no-worker-zygote): a forked worker shares most of its pages with the zygote, whose group they stay charged
    to (tests/netns/test_worker_zygote_agent.py checks what a forked worker's group is charged)."""
    config = _limits_config(tmp_path / "agent.yaml", {"memory_max_mb": 128})
    with running_agent(f"{run_prefix}j", ["--config", str(config), "--no-worker-zygote"]) as env:
        pid = eventually(lambda: _worker_pids(env.agent.pid).get("oam", [None])[0])
        memory = _group(pid, "memory")
        assert memory.name == "plane-oam"
        usage = int(_read(memory, "memory.current", "memory.usage_in_bytes"))
        anon = _anon_bytes(pid)
        print(f"plane-oam group charged {usage / MIB:.1f} MiB, worker's anonymous memory {anon / MIB:.1f} MiB")
        assert usage >= 0.8 * anon
