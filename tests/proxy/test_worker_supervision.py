"""Real worker processes on loopback, driven by the agent's PlaneWorkers: a stopped (SIGSTOP) worker's late
replies never answer a later request, a push does not wait for a stuck worker, and a stuck worker is restarted
on the same listening socket with the newest snapshot."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from planemesh.agent import worker_supervisor as workers_mod
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.agent.worker_supervisor import PlaneWorkers
from planemesh.model.config import DirectResponse, Route, Snapshot
from tests.proxy.proxy_harness import PLANE, Backend, make_snapshot

OPTIONS = {"upstream_mark": 0, "drain_timeout": 0.5}


def status(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/x")
        return conn.getresponse().status
    finally:
        conn.close()


def snapshots(port: int, backend: Backend) -> tuple[Snapshot, Snapshot]:
    """Passes to the backend (200), and the same answered 403 by the proxy itself."""
    open_snap = make_snapshot(port, [("127.0.0.1", backend.server_port)])
    deny = (Route(action=None, direct_response=DirectResponse(403, b"denied")),)
    return open_snap, replace(make_snapshot(port, [], routes=deny), version="t2")


async def run_plane(body) -> None:  # type: ignore[no-untyped-def]
    with Backend() as backend:
        sock = make_listener_socket(0, transparent=False)
        port = sock.getsockname()[1]
        first, deny = snapshots(port, backend)
        plane = PlaneWorkers(PLANE, 1, [sock], OPTIONS)
        await plane.start(first, {})
        supervisor = asyncio.create_task(plane.supervise())
        try:
            assert await asyncio.to_thread(status, port) == 200
            await body(plane, port, deny)
        finally:
            supervisor.cancel()
            await plane.stop(0.5)


def test_an_execd_worker_starts_with_its_death_signal_set_and_maps_no_ctypes() -> None:
    """setpriv set its PR_SET_PDEATHSIG before python ran (agent/parent_death.py; tests/unit/test_parent_death.py
    kills a parent for real): the worker was told so, and never loaded ctypes (~0.35 MB of RSS)."""

    async def body(plane: PlaneWorkers, port: int, deny: Snapshot) -> None:
        pid = plane.workers[0].pid
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"planemesh.agent.worker_process" in argv and argv[-3:] == [b"--pdeathsig", b"set", b""]
        mapped = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()}
        assert not [m for m in mapped if "_ctypes" in m or "libffi" in m]

    asyncio.run(run_plane(body))


def test_late_stats_reply_is_not_read_as_the_snapshot_ack() -> None:
    async def body(plane: PlaneWorkers, port: int, deny: Snapshot) -> None:
        pid = plane.workers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            assert await plane.stats() == []  # times out after 2 s: its reply comes after SIGCONT
            await asyncio.sleep(1.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.3)
        await plane.update(deny, {})  # old code: "expected applied, got {'op': 'stats', ...}"
        assert await asyncio.to_thread(status, port) == 403
        assert plane.workers[0].pid == pid, "a 3 s stall is not a reason to restart"
        assert len(await plane.stats()) == 1

    asyncio.run(run_plane(body))


def test_push_to_a_stuck_worker_does_not_wait_and_the_restarted_worker_gets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers_mod, "STALL_RESTART_S", 3.0)

    async def body(plane: PlaneWorkers, port: int, deny: Snapshot) -> None:
        pid = plane.workers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # never continued: the supervisor has to kill it
        assert await plane.stats() == []
        started = time.monotonic()
        await plane.update(deny, {})
        assert time.monotonic() - started < 1.0, "the push waited for a worker known to be stuck"

        async def restarted() -> None:
            while not (plane.workers[0].ready and plane.workers[0].pid != pid):
                await asyncio.sleep(0.1)

        await asyncio.wait_for(restarted(), 15)
        assert plane.restarts == 1
        # The connection queued in the shared backlog meanwhile is served by the new worker, on the new config.
        assert await asyncio.to_thread(status, port) == 403

    asyncio.run(run_plane(body))
