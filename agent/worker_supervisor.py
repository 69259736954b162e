"""The agent's side of the per-plane worker processes: spawn, configure, collect stats, supervise, drain.

A worker that stops answering is a problem of that worker, never of the agent: requests to it time out (their
late replies are dropped by id, agent/worker_channel.py), a snapshot push does not wait for it, and the
supervisor kills it once it has been stuck for STALL_RESTART_S and starts a new one on the same listening
sockets (the agent keeps them: connections queue in the backlog meanwhile, none is refused) with the newest
snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from planemesh import module_argv
from planemesh.agent.cpu_groups import CpuGroups, join_argv
from planemesh.agent.parent_death import exec_prefix
from planemesh.agent.worker_channel import RequestTable, SnapshotEncoder, read_message
from planemesh.model.config import Snapshot

if TYPE_CHECKING:  # loaded by the agent only with --worker-zygote (daemon.new_zygotes)
    from planemesh.agent.zygote_client import ForkedWorker, Zygotes

log = logging.getLogger("planemesh.workers")
START_TIMEOUT_S = 15.0
START_ATTEMPTS = 3
STATS_TIMEOUT_S = 2.0  # a stats poll (every 0.5 s) not answered by then is dropped; the numbers stay as they were
APPLY_TIMEOUT_S = 5.0  # how long a snapshot push waits for one worker's ack before it goes on without it
# A worker with a request unanswered this long is killed and restarted. Envoy's watchdog has the same idea per
# worker thread (miss 200 ms / megamiss 1 s counted, kill off by default); a process restart costs the worker's
# open connections, so only a worker stuck for seconds (a CPU-bound loop, SIGSTOP) is restarted.
STALL_RESTART_S = 5.0
SUPERVISE_TICK_S = 0.5
RESTART_WINDOW_S = 30.0  # restarts counted for the back-off (0.1 s per recent restart, at most 2 s)


class WorkerStartError(RuntimeError):
    pass


class WorkerUnavailable(RuntimeError):
    """The worker did not answer in time, or its channel is gone: the supervisor deals with it."""


class WorkerProcess:
    """One worker process of one plane, with its control channel (requests matched to replies by id)."""

    def __init__(
        self,
        plane: str,
        index: int,
        listeners: list[socket.socket],
        options: dict[str, Any],
        groups: list[str] | None = None,
        zygote: Zygotes | None = None,
    ) -> None:
        self.plane = plane
        self.zygote = zygote  # None: started by exec; else forked by the zygote (agent/zygote.py)
        self.groups = groups or []  # cgroup.procs files the process joins before it execs (CpuGroups.procs_files)
        self.index = index
        self._listeners = listeners
        self._options = options
        self._proc: asyncio.subprocess.Process | ForkedWorker | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._table = RequestTable()
        self._encoder = SnapshotEncoder()  # snapshots go as changes to the last one (worker_channel.py)
        self._waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._replies: asyncio.Task[None] | None = None
        self.pid: int | None = None
        self.ready = False  # answered the first snapshot and its channel is open

    @property
    def name(self) -> str:
        return f"{self.plane}/{self.index}"

    def _argv(self, fds: list[int], name: Any) -> list[str]:
        """The worker's arguments; `name(i)`: how the i-th of `fds` is named to it (its number, or "{i}")."""
        argv = [
            "--plane", self.plane,
            "--control-fd", name(0),
            "--upstream-mark", hex(self._options["upstream_mark"]),
            "--drain-timeout", str(self._options.get("drain_timeout", 5.0)),
        ]  # fmt: skip
        for i in range(1, len(self._listeners) + 1):
            argv += ["--listen-fd", name(i)]
        if self._options.get("access_log"):
            argv += ["--access-log", self._options["access_log"]]
        if self._options.get("host_map_fd") is not None:  # host mode: original destinations by peer
            argv += ["--host-map-fd", name(len(fds) - 1)]
        return argv

    async def start(self, first: dict[str, Any]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [theirs.fileno(), *(s.fileno() for s in self._listeners)]
        if self._options.get("host_map_fd") is not None:
            fds.append(self._options["host_map_fd"])
        try:
            if self.zygote is not None:  # forked from the pre-imported zygote: code pages shared (agent/zygote.py)
                from planemesh.agent.zygote_client import ZygoteError  # loaded: self.zygote is its Zygotes

                try:
                    self._proc = await self.zygote.fork(self._argv(fds, lambda i: f"{{{i}}}"), fds, self.groups)
                except ZygoteError as exc:  # the next attempt starts a new zygote
                    raise WorkerStartError(f"worker {self.name}: {exc}") from exc
            else:
                argv = [*module_argv("planemesh.agent.worker_process"), *self._argv(fds, lambda i: str(fds[i]))]
                if prefix := exec_prefix():  # setpriv sets its PDEATHSIG: no ctypes in the worker (parent_death.py)
                    argv = [*prefix, *argv, "--pdeathsig", "set"]
                self._proc = await asyncio.create_subprocess_exec(*join_argv(self.groups, argv), pass_fds=fds)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = self._proc.pid
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        try:
            self._writer.write(self._encoder.encode(first))
            await self._writer.drain()
            async with asyncio.timeout(START_TIMEOUT_S):
                reply = await read_message(reader)
        except (ConnectionError, TimeoutError, ValueError, EOFError) as exc:
            reply = {"op": f"failed: {exc!r}"}
        if reply is None or reply.get("op") != "ready":
            self.kill()
            code = await self._proc.wait()
            self.close_channel()
            raise WorkerStartError(f"worker {self.name} did not start (exit {code}, {reply!r})")
        self._replies = asyncio.create_task(self._read_replies(reader), name=f"replies-{self.name}")
        self.ready = True

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        """Hands each reply to the request waiting for it; a late one is dropped, a bad one ends the worker."""
        try:
            while (msg := await read_message(reader)) is not None:
                rid = self._table.reply(msg)
                if rid is None:
                    log.info("worker %s: dropped a late %r reply", self.name, msg.get("op"))
                    continue
                waiter = self._waiters.pop(rid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
        except Exception as exc:  # ChannelError, a torn or unreadable message, a reset: restart the worker
            log.error("worker %s: control channel broken (%s); restarting it", self.name, exc)
            self.kill()
        finally:
            self._fail_waiters()

    def _fail_waiters(self) -> None:
        self.ready = False
        self._table.close()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(WorkerUnavailable(f"worker {self.name}: control channel closed"))
        self._waiters.clear()

    async def request(self, message: dict[str, Any], expect: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send a request and wait for its reply; WorkerUnavailable when none comes within `timeout`."""
        if not self.ready or self._writer is None:
            raise WorkerUnavailable(f"worker {self.name} is not running")
        rid = self._table.new(expect, time.monotonic())
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = waiter
        try:
            self._writer.write(self._encoder.encode({**message, "id": rid}))
            async with asyncio.timeout(timeout):
                await self._send_and_wait(waiter)
            return waiter.result()
        except (TimeoutError, ConnectionError) as exc:
            self._table.abandon(rid)
            raise WorkerUnavailable(f"worker {self.name}: no {expect!r} reply within {timeout:g}s") from exc
        finally:
            self._waiters.pop(rid, None)

    async def _send_and_wait(self, waiter: asyncio.Future[dict[str, Any]]) -> None:
        assert self._writer is not None
        await self._writer.drain()
        await waiter

    def post(self, message: dict[str, Any], expect: str) -> None:
        """Send a request without waiting for it (to a worker already stuck); its reply will be dropped."""
        if not self.ready or self._writer is None:
            return
        rid = self._table.new(expect, time.monotonic())
        self._table.abandon(rid)
        self._writer.write(self._encoder.encode({**message, "id": rid}))

    def stalled_for(self) -> float:
        """Seconds the oldest unanswered request has waited (0 when none is open)."""
        return self._table.stalled_for(time.monotonic()) if self.ready else 0.0

    def waiting(self, expect: str) -> bool:
        return self._table.waiting(expect)

    @property
    def proc_started(self) -> bool:
        return self._proc is not None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def wait(self) -> int:
        assert self._proc is not None
        return await self._proc.wait()

    def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    def close_channel(self) -> None:
        self.ready = False
        if self._replies is not None:
            self._replies.cancel()
        if self._writer is not None:
            self._writer.close()
        self._fail_waiters()

    async def stop(self, drain_timeout: float) -> None:
        if not self.alive:
            self.close_channel()
            return
        if self.stalled_for() <= STATS_TIMEOUT_S:  # a stuck worker would not drain: it is killed below
            with contextlib.suppress(WorkerUnavailable):
                await self.request({"op": "drain", "timeout": drain_timeout}, "drained", timeout=drain_timeout + 5)
        elif self._proc is not None and self._proc.returncode is None:
            self.kill()
        assert self._proc is not None
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await self._proc.wait()
            except TimeoutError:
                self.kill()
                await self._proc.wait()
        self.close_channel()


class PlaneWorkers:
    """All worker processes of one plane, sharing the plane's listening sockets."""

    def __init__(
        self,
        plane: str,
        count: int,
        listeners: list[socket.socket],
        options: dict[str, Any],
        cpu_groups: CpuGroups | None = None,
    ) -> None:
        self.plane = plane
        self.cpu_groups = cpu_groups or CpuGroups(None)
        self.listeners = listeners
        self._options = options
        self.workers = [self._new_worker(i) for i in range(count)]
        self._last: dict[str, Any] | None = None
        self.restarts = 0
        self._restart_times: list[float] = []
        self.stopped = False  # stop() called: supervise() must not start workers on closed sockets
        self.shed = 0.0  # the node-wide overload's shed fraction for this plane (agent/node_overload.py)

    def _new_worker(self, index: int) -> WorkerProcess:
        groups = self.cpu_groups.procs_files(self.plane)
        return WorkerProcess(self.plane, index, self.listeners, self._options, groups, self._options.get("zygote"))

    async def start(self, snapshot: Snapshot, sources: dict[str, dict[int, str]]) -> None:
        self._last = {"op": "snapshot", "snapshot": snapshot, "sources": sources}
        await asyncio.gather(*(self._start_one(i) for i in range(len(self.workers))))

    async def _start_one(self, index: int, attempts: int = START_ATTEMPTS) -> None:
        """Start a worker; one that dies before it reports ready is logged and started afresh."""
        assert self._last is not None
        for attempt in range(1, attempts + 1):
            sent = self._last
            try:
                await self.workers[index].start(sent)
            except WorkerStartError as exc:
                if attempt == attempts or self.stopped:
                    raise
                log.error("%s; starting it again (attempt %d)", exc, attempt + 1)
                self.workers[index] = self._new_worker(index)
                await asyncio.sleep(min(0.1 * attempt, 2.0))
                continue
            self.cpu_groups.add(self.plane, self.workers[index].pid or 0)
            if self._last is not sent:  # a snapshot came while it started: it gets the newest one
                await self._push(self.workers[index], self._last)
            if self.shed:
                await self._send_shed(self.workers[index], self.shed)
            return

    async def set_shed(self, fraction: float) -> None:
        """Tell every worker the share of requests to refuse for the node's sake (only when it changed). A worker
        that is starting or restarted gets it once ready; a stuck one has it queued."""
        if fraction == self.shed:
            return
        self.shed = fraction
        await asyncio.gather(*(self._send_shed(w, fraction) for w in self.workers if w.ready))

    async def _send_shed(self, worker: WorkerProcess, fraction: float) -> None:
        message = {"op": "shed", "fraction": fraction}
        if worker.stalled_for() > STATS_TIMEOUT_S:
            worker.post(message, "shed_set")
            return
        with contextlib.suppress(WorkerUnavailable):
            await worker.request(message, "shed_set", timeout=APPLY_TIMEOUT_S)

    async def update(self, snapshot: Snapshot, sources: dict[str, dict[int, str]]) -> None:
        """Push a snapshot to every worker. Never fails for a worker's sake: one that is stuck gets it queued
        (it applies it when it resumes, or is restarted with it), one that is starting gets it once ready."""
        self._last = {"op": "snapshot", "snapshot": snapshot, "sources": sources}
        await asyncio.gather(*(self._push(w, self._last) for w in self.workers))

    async def _push(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        if not worker.ready:
            return  # dead or starting: _start_one sends it self._last
        if worker.stalled_for() > STATS_TIMEOUT_S:
            log.warning("worker %s is not answering: snapshot queued for it, not waited for", worker.name)
            worker.post(message, "applied")
            return
        try:
            await worker.request(message, "applied", timeout=APPLY_TIMEOUT_S)
        except WorkerUnavailable as exc:
            log.warning("%s; the others applied the snapshot, it gets it when it resumes or restarts", exc)

    async def stats(self) -> list[dict[str, Any]]:
        # One stats request at a time per worker: a stuck worker is not sent a new one every poll.
        polled = [w for w in self.workers if w.ready and not w.waiting("stats")]
        replies = await asyncio.gather(
            *(w.request({"op": "stats"}, "stats", timeout=STATS_TIMEOUT_S) for w in polled), return_exceptions=True
        )
        return [r["stats"] for r in replies if isinstance(r, dict)]

    async def supervise(self) -> None:
        """Restart a worker that dies or is stuck; runs until cancelled or stop(). Never gives up on a plane."""
        while not self.stopped:
            waits = {asyncio.ensure_future(w.wait()): w for w in self.workers if w.alive}
            try:
                done: set[asyncio.Future[int]] = set()
                if waits:
                    done, _ = await asyncio.wait(waits, timeout=SUPERVISE_TICK_S, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.sleep(SUPERVISE_TICK_S)
            finally:
                for fut in waits:
                    if not fut.done():
                        fut.cancel()
            if self.stopped:
                return
            for fut in done:
                dead = waits[fut]
                log.error("worker %s exited with %s; restarting", dead.name, fut.result())
                await self._restart(dead.index)
            for index, worker in enumerate(self.workers):
                if worker.proc_started and not worker.alive and not self.stopped:
                    await self._restart(index)  # died while we were busy restarting another
            self._kill_stuck()

    def _kill_stuck(self) -> None:
        for worker in self.workers:
            stuck = worker.stalled_for()
            if stuck > STALL_RESTART_S:
                log.error("worker %s has not answered for %.1fs; killing it to restart it", worker.name, stuck)
                worker.close_channel()
                worker.kill()

    async def _restart(self, index: int) -> None:
        self.workers[index].close_channel()
        self.workers[index] = self._new_worker(index)
        self.restarts += 1
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < RESTART_WINDOW_S] + [now]
        while not self.stopped:
            await asyncio.sleep(min(0.1 * len(self._restart_times), 2.0))
            try:
                await self._start_one(index)
                return
            except Exception as exc:  # no start (or no fork, no cgroup): keep trying, the other planes are fine
                log.error("worker %s/%d: %s; plane %s keeps trying", self.plane, index, exc, self.plane)
                self.workers[index].close_channel()
                self.workers[index].kill()
                self.workers[index] = self._new_worker(index)

    async def stop(self, drain_timeout: float) -> None:
        self.stopped = True
        await asyncio.gather(*(w.stop(drain_timeout) for w in self.workers))
        for sock in self.listeners:
            sock.close()
