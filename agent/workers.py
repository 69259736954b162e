"""The agent's side of the per-plane worker processes: spawn, configure, collect stats, supervise, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from typing import Any

from planemesh.agent.config import Snapshot
from planemesh.agent.cpu_groups import CpuGroups
from planemesh.agent.worker_channel import encode, read_message

log = logging.getLogger("planemesh.workers")
START_TIMEOUT_S = 15.0
START_ATTEMPTS = 3


class WorkerStartError(RuntimeError):
    pass


class WorkerProcess:
    """One worker process of one plane, with its control channel (requests answered in order)."""

    def __init__(self, plane: str, index: int, listeners: list[socket.socket], options: dict[str, Any]) -> None:
        self.plane = plane
        self.index = index
        self._listeners = listeners
        self._options = options
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self.pid: int | None = None

    async def start(self, first: dict[str, Any]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [
            sys.executable, "-m", "planemesh.agent.worker",
            "--plane", self.plane,
            "--control-fd", str(theirs.fileno()),
            "--upstream-mark", hex(self._options["upstream_mark"]),
            "--drain-timeout", str(self._options.get("drain_timeout", 5.0)),
        ]  # fmt: skip
        for sock in self._listeners:
            argv += ["--listen-fd", str(sock.fileno())]
        if self._options.get("access_log"):
            argv += ["--access-log", self._options["access_log"]]
        fds = [theirs.fileno(), *(s.fileno() for s in self._listeners)]
        if self._options.get("host_map_fd") is not None:  # host mode: original destinations by peer
            argv += ["--host-map-fd", str(self._options["host_map_fd"])]
            fds.append(self._options["host_map_fd"])
        self._proc = await asyncio.create_subprocess_exec(*argv, pass_fds=fds)
        theirs.close()
        self.pid = self._proc.pid
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        try:
            self._writer.write(encode(first))
            await self._writer.drain()
            reply = await asyncio.wait_for(read_message(self._reader), START_TIMEOUT_S)
        except (ConnectionError, TimeoutError) as exc:
            reply = {"op": f"failed: {exc!r}"}
        if reply is None or reply.get("op") != "ready":
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            code = await self._proc.wait()
            raise WorkerStartError(f"worker {self.plane}/{self.index} did not start (exit {code}, {reply!r})")

    async def request(self, message: dict[str, Any], expect: str, timeout: float = 10.0) -> dict[str, Any]:
        assert self._writer is not None and self._reader is not None
        async with self._lock:
            self._writer.write(encode(message))
            await self._writer.drain()
            reply = await asyncio.wait_for(read_message(self._reader), timeout)
        if reply is None or reply.get("op") != expect:
            raise RuntimeError(f"worker {self.plane}/{self.index}: expected {expect}, got {reply!r}")
        return reply

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def wait(self) -> int:
        assert self._proc is not None
        return await self._proc.wait()

    async def stop(self, drain_timeout: float) -> None:
        if not self.alive:
            return
        with contextlib.suppress(Exception):
            await self.request({"op": "drain", "timeout": drain_timeout}, "drained", timeout=drain_timeout + 5)
        assert self._proc is not None
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._writer is not None:
            self._writer.close()


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
        self.workers = [WorkerProcess(plane, i, listeners, options) for i in range(count)]
        self._last: dict[str, Any] | None = None
        self.restarts = 0
        self.stopped = False  # stop() called: supervise() must not start workers on closed sockets

    async def start(self, snapshot: Snapshot, sources: dict[str, dict[int, str]]) -> None:
        self._last = {"op": "snapshot", "snapshot": snapshot, "sources": sources}
        await asyncio.gather(*(self._start_one(i) for i in range(len(self.workers))))

    async def _start_one(self, index: int) -> None:
        """Start a worker; one that dies before it reports ready is logged and started afresh."""
        assert self._last is not None
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                await self.workers[index].start(self._last)
                self.cpu_groups.add(self.plane, self.workers[index].pid or 0)
                return
            except WorkerStartError as exc:
                if attempt == START_ATTEMPTS:
                    raise
                log.error("%s; starting it again (attempt %d)", exc, attempt + 1)
                self.workers[index] = WorkerProcess(self.plane, index, self.listeners, self._options)
                await asyncio.sleep(0.1 * attempt)

    async def update(self, snapshot: Snapshot, sources: dict[str, dict[int, str]]) -> None:
        self._last = {"op": "snapshot", "snapshot": snapshot, "sources": sources}
        await asyncio.gather(*(w.request(self._last, "applied") for w in self.workers if w.alive))

    async def stats(self) -> list[dict[str, Any]]:
        replies = await asyncio.gather(
            *(w.request({"op": "stats"}, "stats", timeout=2) for w in self.workers if w.alive), return_exceptions=True
        )
        return [r["stats"] for r in replies if isinstance(r, dict)]

    async def supervise(self) -> None:
        """Restart a worker that dies; runs until cancelled or stop()."""
        while not self.stopped:
            waits = {asyncio.ensure_future(w.wait()): w for w in self.workers if w.alive}
            if not waits:
                await asyncio.sleep(0.5)
                continue
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in waits:
                    if not fut.done():
                        fut.cancel()
            for fut in done:
                if self.stopped:
                    return
                dead = waits[fut]
                log.error("worker %s/%d exited with %s; restarting", self.plane, dead.index, fut.result())
                self.workers[dead.index] = WorkerProcess(self.plane, dead.index, self.listeners, self._options)
                self.restarts += 1
                await asyncio.sleep(min(0.1 * self.restarts, 2.0))
                await self._start_one(dead.index)

    async def stop(self, drain_timeout: float) -> None:
        self.stopped = True
        await asyncio.gather(*(w.stop(drain_timeout) for w in self.workers))
        for sock in self.listeners:
            sock.close()
