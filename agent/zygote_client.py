"""The agent's side of the worker fork server (agent/zygote.py): start it, ask it for a worker, watch the worker.

A forked worker is not the agent's child, so it is handled through a pidfd the zygote sends with each pid:
signals go to the pidfd (never to a pid that may have been reused), its exit is the pidfd becoming readable,
and its exit code comes from the zygote's {"exited"} report. ForkedWorker has the part of
asyncio.subprocess.Process the supervisor uses (pid, returncode, wait, kill, terminate).

If the zygote dies, its workers die with it (PDEATHSIG): their pidfds report it, the supervisor restarts them,
and the next request starts a new zygote.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from planemesh import module_argv
from planemesh.agent.zygote import MAX_FDS, MAX_MESSAGE, exit_code, run_forked

log = logging.getLogger("planemesh.zygote")
START_TIMEOUT_S = 30.0  # interpreter start plus the worker's imports, on a loaded node
EXIT_CODE_WAIT_S = 1.0  # after the pidfd says the worker is gone, how long its exit code may take to arrive
UNKNOWN_EXIT = -255  # the zygote died before it could report the code


class ZygoteError(RuntimeError):
    pass


class ForkedWorker:
    """A worker forked by the zygote, watched through its pidfd."""

    def __init__(self, pid: int, pidfd: int, code: asyncio.Future[int]) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self._code = code
        self.returncode: int | None = None
        self._gone = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        if not self._gone.done():
            self._gone.set_result(None)

    async def wait(self) -> int:
        if self.returncode is None:
            await asyncio.shield(self._gone)
            try:
                async with asyncio.timeout(EXIT_CODE_WAIT_S):
                    code = await asyncio.shield(self._code)
            except (TimeoutError, ZygoteError):
                code = UNKNOWN_EXIT
            if self.returncode is None:
                self.returncode = code
                os.close(self._pidfd)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None or self._gone.done():
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Zygote:
    """A running fork server: requests go one at a time, exits are read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self.proc = proc
        self._sock = sock
        self._lock = asyncio.Lock()
        # the fork's answer, its descriptors and its exit code's future (made when the answer is read: the exit may
        # be read before fork() resumes, and must not find the future gone)
        self._reply: asyncio.Future[tuple[dict[str, Any], list[int], asyncio.Future[int] | None]] | None = None
        self._codes: dict[int, asyncio.Future[int]] = {}
        self.closed = False
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._readable)

    @classmethod
    async def start(cls, env: dict[str, str] | None = None) -> Zygote:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        try:
            proc = await asyncio.create_subprocess_exec(
                *module_argv("planemesh.agent.zygote"), "--fd", str(theirs.fileno()),
                pass_fds=[theirs.fileno()], env=env,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        log.info("worker zygote started (pid %d)", proc.pid)
        return cls(proc, ours)

    def _readable(self) -> None:
        fds = array.array("i")
        try:
            data, ancdata, _, _ = self._sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
        except BlockingIOError:
            return
        except OSError:
            data, ancdata = b"", []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        if not data:
            self._closed("the zygote closed its socket")
            return
        message = json.loads(data)
        if "exited" in message:
            code = self._codes.pop(int(message["exited"]), None)
            if code is not None and not code.done():
                code.set_result(int(message["code"]))
        elif self._reply is not None and not self._reply.done():
            code = None
            if "pid" in message:  # its exit may be reported before fork() resumes: listen for it now
                code = self._codes[int(message["pid"])] = asyncio.get_running_loop().create_future()
            self._reply.set_result((message, list(fds), code))
        else:  # not asked for: never leak a descriptor
            for fd in fds:
                os.close(fd)

    def _closed(self, why: str, error: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        log.log(logging.ERROR if error else logging.INFO, "worker zygote: %s", why)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        failed = ZygoteError(why)
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(failed)
        for code in self._codes.values():
            if not code.done():
                code.set_exception(failed)
        self._codes.clear()

    async def fork(self, argv: list[str], fds: list[int], groups: list[str]) -> ForkedWorker:
        """A new worker running worker_process.main(argv) ("{i}" in argv: the i-th of `fds` in the child)."""
        async with self._lock:
            if self.closed:
                raise ZygoteError("the zygote is gone")
            loop = asyncio.get_running_loop()
            self._reply = loop.create_future()
            payload = json.dumps({"argv": argv, "groups": groups}).encode()
            try:
                self._sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            except OSError as exc:
                self._closed(f"cannot send a fork request: {exc}")
                raise ZygoteError(f"the zygote is gone ({exc})") from exc
            try:
                async with asyncio.timeout(START_TIMEOUT_S):
                    message, got, code = await self._reply
            except TimeoutError:
                self._closed("no answer to a fork request")
                self.proc.kill()
                raise ZygoteError("the zygote did not answer") from None
            if "pid" not in message or len(got) != 1:
                for fd in got:
                    os.close(fd)
                raise ZygoteError(f"fork refused: {message.get('error', message)!r}")
            pid = int(message["pid"])
            return ForkedWorker(pid, got[0], code or loop.create_future())

    async def close(self) -> None:
        """Stop the zygote (its workers stopped first: the ones still alive get SIGTERM and drain)."""
        if not self.closed:
            self._closed("closed by the agent", error=False)
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class ChildProcess:
    """The part of asyncio.subprocess.Process Zygote uses, for a zygote this process forked itself."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _poll(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == 0:
                    return
                self.returncode = exit_code(status)

    async def wait(self) -> int:
        self._poll()
        while self.returncode is None:
            await asyncio.sleep(0.05)
            self._poll()
        return self.returncode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        self._poll()
        if self.returncode is None:  # not reaped yet: the pid is still ours
            os.kill(self.pid, sig)


class Zygotes:
    """The agent's one zygote, (re)started on demand: a dead one is replaced by the next fork request."""

    def __init__(self) -> None:
        self._zygote: Zygote | None = None
        self._starting = asyncio.Lock()
        self._forked: tuple[int, socket.socket] | None = None  # forked by prefork(), adopted at the first request

    @classmethod
    def prefork(cls) -> Zygotes:
        """Fork the zygote from the agent now, while the agent has one thread and no event loop (forking a
        threaded process is unsafe), so the zygote and its workers also share what the agent imported. With
        another thread running already, the first request execs a zygote instead."""
        zygotes = cls()
        if threading.active_count() != 1:
            log.warning("worker zygote: the agent already runs threads; the zygote will be exec'd")
            return zygotes
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # What exists now is kept for good on both sides: no collection in the zygote or its workers walks (and
        # so writes to, copying) the pages they share with the agent.
        gc.collect()
        gc.freeze()
        sys.stdout.flush()  # nothing buffered is written twice
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_forked(theirs.fileno())
        theirs.close()
        ours.setblocking(False)
        zygotes._forked = (pid, ours)
        return zygotes

    async def fork(self, argv: list[str], fds: list[int], groups: list[str]) -> ForkedWorker:
        async with self._starting:
            if self._forked is not None:
                pid, sock = self._forked
                self._forked = None
                self._zygote = Zygote(ChildProcess(pid), sock)  # type: ignore[arg-type]
                log.info("worker zygote forked from the agent (pid %d)", pid)
            if self._zygote is None or self._zygote.closed or self._zygote.proc.returncode is not None:
                if self._zygote is not None:
                    await self._zygote.close()
                env = {**os.environ, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
                self._zygote = await Zygote.start(env)
            zygote = self._zygote
        return await zygote.fork(argv, fds, groups)

    @property
    def pid(self) -> int | None:
        if self._forked is not None:
            return self._forked[0]
        return self._zygote.proc.pid if self._zygote is not None and not self._zygote.closed else None

    async def close(self) -> None:
        if self._forked is not None:  # never asked for a worker: closing its socket ends it
            pid, sock = self._forked
            self._forked = None
            sock.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await ChildProcess(pid).wait()
        if self._zygote is not None:
            await self._zygote.close()
            self._zygote = None
