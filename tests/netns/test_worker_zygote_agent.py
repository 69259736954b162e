"""The real agent with its workers forked by the zygote (agent/zygote.py, --worker-zygote): traffic through forked
workers in every plane, each worker in its plane's groups with its own memory charged there, workers that die with
a SIGKILLed agent, a hot upgrade whose successor forks its workers from a zygote of its own, and the default's
exec'd workers (also with --no-worker-zygote, which overrides --worker-zygote)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from planemesh.agent.demo import start_agent
from planemesh.labs import netns as ns_tools
from planemesh.labs import procs
from tests.netns.agent_lab import eventually, running_agent
from tests.netns.test_cpu_groups import _group, _limits_config, _read
from tests.netns.test_stalled_worker import all_answer

pytestmark = pytest.mark.netns
MIB = 1 << 20
ZYGOTE = ["--worker-zygote"]


def _gone(pid: int) -> bool:
    """Exited: no process, or a zombie left to whoever reaps orphans here (its parent, the zygote, is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _zygote_and_workers(agent_pid: int) -> tuple[int, list[int]] | None:
    """The zygote and the workers it forked."""
    zygotes = procs.zygotes(agent_pid)
    if len(zygotes) != 1:
        return None
    workers = procs.children(zygotes[0])
    return (zygotes[0], workers) if len(workers) == 2 else None  # the default config: two planes, one worker each


def _private_dirty_bytes(pid: int) -> int:
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    return int(next(x for x in rollup if x.startswith("Private_Dirty:")).split()[1]) * 1024


def test_forked_workers_serve_each_plane_in_its_groups_and_die_with_the_agent(run_prefix: str, tmp_path: Path) -> None:
    config = _limits_config(tmp_path / "agent.yaml", {"memory_max_mb": 128})
    with running_agent(f"{run_prefix}z", ["--config", str(config), *ZYGOTE]) as env:
        found = eventually(lambda: _zygote_and_workers(env.agent.pid))
        assert found, "no zygote with two forked workers under the agent"
        zygote, workers = found
        assert sorted(procs.comm(p) for p in workers) == ["pmw:media", "pmw:oam"]  # the plane in the name
        assert procs.workers_by_plane(env.agent.pid) == {procs.worker_plane(p): [p] for p in workers}
        assert eventually(lambda: all_answer(env, 200), 10)
        planes = set()
        for pid in workers:
            memory = _group(pid, "memory")
            assert memory.parent.name == f"planemesh-{env.agent.pid}" and memory.name.startswith("plane-")
            assert _group(pid, "cpu").name == memory.name
            planes.add(memory.name)
            # Pages shared with the zygote stay charged to the agent's group; what the worker wrote is its plane's.
            usage = int(_read(memory, "memory.current", "memory.usage_in_bytes"))
            own = _private_dirty_bytes(pid)
            print(f"{memory.name}: charged {usage / MIB:.1f} MiB, the worker's private dirty {own / MIB:.1f} MiB")
            assert usage >= 0.75 * own
        assert planes == {"plane-oam", "plane-media"}
        assert _group(zygote, "memory").name != "plane-oam"
        env.agent.kill()  # SIGKILL: the zygote (PDEATHSIG) and then its workers (theirs) go with it
        env.agent.wait(10)
        assert eventually(lambda: all(_gone(p) for p in [zygote, *workers]), 10)


def test_a_hot_upgrade_hands_over_to_workers_forked_by_the_successors_zygote(run_prefix: str, tmp_path: Path) -> None:
    args = list(ZYGOTE)
    with running_agent(f"{run_prefix}u", args) as env:
        old = eventually(lambda: _zygote_and_workers(env.agent.pid))
        assert old and eventually(lambda: all_answer(env, 200), 10)
        successor = start_agent(env.lab, tmp_path, args)
        try:
            assert env.agent.wait(30) == 0, env.agent_output()
            new = eventually(lambda: _zygote_and_workers(successor.pid))
            assert new and not set(new[1]) & set(old[1])
            assert eventually(lambda: not any(Path(f"/proc/{p}").exists() for p in [old[0], *old[1]]), 15)
            assert eventually(lambda: all_answer(env, 200), 10)
        finally:
            assert ns_tools.stop(successor, signal.SIGTERM) == 0


def test_a_killed_zygote_takes_its_workers_and_an_execd_one_replaces_it(run_prefix: str) -> None:
    with running_agent(f"{run_prefix}k", ZYGOTE) as env:
        old = eventually(lambda: _zygote_and_workers(env.agent.pid))
        assert old and procs.comm(old[0]) == "pm-zygote" and eventually(lambda: all_answer(env, 200), 10)
        os.kill(old[0], signal.SIGKILL)  # its workers die with it (PDEATHSIG); the supervisor restarts them
        new = eventually(lambda: (got := _zygote_and_workers(env.agent.pid)) and got[0] != old[0] and got, 30)
        assert new, env.agent_output()
        assert b"planemesh.agent.zygote" in Path(f"/proc/{new[0]}/cmdline").read_bytes()
        assert eventually(lambda: all(_gone(p) for p in old[1]), 15)
        assert eventually(lambda: all_answer(env, 200), 10)
        assert env.agent.poll() is None


@pytest.mark.parametrize("flags", [[], ["--worker-zygote", "--no-worker-zygote"]], ids=["default", "no-zygote"])
def test_workers_are_execd_as_the_agents_children_by_default(run_prefix: str, flags: list[str]) -> None:
    with running_agent(f"{run_prefix}x", flags) as env:
        workers = eventually(lambda: (w := procs.workers_by_plane(env.agent.pid)) and len(w) == 2 and w)
        assert workers and sorted(workers) == ["media", "oam"]
        assert procs.zygotes(env.agent.pid) == []
        for (pid,) in workers.values():
            assert b"planemesh.agent.worker_process" in procs.cmdline(pid)
            assert pid in procs.children(env.agent.pid)
        assert eventually(lambda: all_answer(env, 200), 10)
