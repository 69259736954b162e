"""Workers forked by the zygote (agent/zygote.py) on loopback, driven by the agent's PlaneWorkers: they serve, sit
in their groups, share the zygote's pages, and are restarted when they die, stall, or lose their zygote."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import uvloop

from planemesh.agent import worker_supervisor as workers_mod
from planemesh.agent.cpu_groups import CpuGroups
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.agent.worker_supervisor import PlaneWorkers
from planemesh.agent.zygote_client import Zygotes
from planemesh.model.config import Snapshot
from tests.proxy.proxy_harness import PLANE, Backend
from tests.proxy.test_worker_supervision import snapshots, status


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _rollup(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    return {k.rstrip(":"): int(v) for k, v, *_ in (line.split() for line in lines)}


async def _restarted(plane: PlaneWorkers, old_pid: int) -> None:
    while not (plane.workers[0].ready and plane.workers[0].pid != old_pid):
        await asyncio.sleep(0.1)


async def run_forked(body, groups: list[str] | None = None) -> None:  # type: ignore[no-untyped-def]
    zygotes = Zygotes()
    with Backend() as backend:
        sock = make_listener_socket(0, transparent=False)
        port = sock.getsockname()[1]
        first, deny = snapshots(port, backend)
        cpu_groups = CpuGroups(None)
        if groups is not None:  # plain files in place of cgroup.procs: they record the pid written to them
            cpu_groups.procs_files = lambda _plane: groups  # type: ignore[method-assign]
        options = {"upstream_mark": 0, "drain_timeout": 0.5, "zygote": zygotes}
        plane = PlaneWorkers(PLANE, 1, [sock], options, cpu_groups)
        await plane.start(first, {})
        supervisor = asyncio.create_task(plane.supervise())
        try:
            assert await asyncio.to_thread(status, port) == 200
            await body(plane, port, deny, zygotes)
        finally:
            supervisor.cancel()
            await plane.stop(0.5)
            await zygotes.close()


def test_a_forked_worker_serves_joins_its_groups_and_shares_the_zygotes_pages(tmp_path: Path) -> None:
    procs = tmp_path / "cgroup.procs"
    procs.touch()

    async def body(plane: PlaneWorkers, port: int, deny: Snapshot, zygotes: Zygotes) -> None:
        pid = plane.workers[0].pid
        assert pid is not None and zygotes.pid is not None
        assert _ppid(pid) == zygotes.pid, "the worker is the zygote's child, not an exec'd process of the agent"
        assert procs.read_text() == str(pid)
        worker = _rollup(pid)
        print(f"forked worker: Rss {worker['Rss'] / 1024:.1f} MB, Pss {worker['Pss'] / 1024:.1f} MB")
        assert worker["Pss"] < 0.85 * worker["Rss"], "nothing shared with the zygote"
        await plane.update(deny, {})
        assert await asyncio.to_thread(status, port) == 403
        assert len(await plane.stats()) == 1

    asyncio.run(run_forked(body, [str(procs)]))


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])  # the agent runs uvloop
def test_a_killed_forked_worker_is_reported_with_its_signal_and_restarted(run) -> None:  # type: ignore[no-untyped-def]
    async def body(plane: PlaneWorkers, port: int, deny: Snapshot, zygotes: Zygotes) -> None:
        dead = plane.workers[0]
        assert dead.pid is not None
        os.kill(dead.pid, signal.SIGKILL)
        assert await asyncio.wait_for(dead.wait(), 10) == -signal.SIGKILL
        await asyncio.wait_for(_restarted(plane, dead.pid), 15)
        assert plane.restarts == 1
        assert await asyncio.to_thread(status, port) == 200

    run(run_forked(body))


def test_a_stuck_forked_worker_is_killed_through_its_pidfd_and_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers_mod, "STALL_RESTART_S", 3.0)

    async def body(plane: PlaneWorkers, port: int, deny: Snapshot, zygotes: Zygotes) -> None:
        pid = plane.workers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # never continued: the supervisor has to kill it
        assert await plane.stats() == []
        started = time.monotonic()
        await plane.update(deny, {})
        assert time.monotonic() - started < 1.0
        await asyncio.wait_for(_restarted(plane, pid), 15)
        assert await asyncio.to_thread(status, port) == 403  # the queued connection, the newest snapshot

    asyncio.run(run_forked(body))


def test_workers_die_with_their_zygote_and_come_back_from_a_new_one() -> None:
    async def body(plane: PlaneWorkers, port: int, deny: Snapshot, zygotes: Zygotes) -> None:
        pid, zygote = plane.workers[0].pid, zygotes.pid
        assert pid is not None and zygote is not None
        os.kill(zygote, signal.SIGKILL)  # the worker's PR_SET_PDEATHSIG ends it too
        await asyncio.wait_for(_restarted(plane, pid), 20)
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert zygotes.pid not in (None, zygote)
        assert _ppid(plane.workers[0].pid or 0) == zygotes.pid
        assert await asyncio.to_thread(status, port) == 200

    asyncio.run(run_forked(body))


def test_prefork_in_a_threaded_agent_forks_nothing() -> None:
    """Forking a process that runs threads is unsafe (a lock held by another thread stays held in the child)."""
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        zygotes = Zygotes.prefork()
    finally:
        release.set()
        thread.join()
    assert zygotes.pid is None, "forked from a threaded process"
    assert zygotes._forked is None  # the first fork request execs `python -m planemesh.agent.zygote` instead


def test_a_worker_that_exits_at_once_reports_its_own_exit_code() -> None:
    """Its exit can be reported right behind its pid, before the fork request resumes: the code is not lost."""

    async def main() -> list[int]:
        zygotes = Zygotes()
        try:
            forked = [await zygotes.fork(["--plane", "oam"], [], []) for _ in range(3)]  # argparse: exit 2
            return [await asyncio.wait_for(w.wait(), 10) for w in forked]
        finally:
            await zygotes.close()

    assert asyncio.run(main()) == [2, 2, 2]
