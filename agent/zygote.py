"""The worker fork server (zygote): a small single-threaded process that imports the worker's code once and forks
each plane worker from it, so the workers share those pages (code objects, module dicts) instead of each holding
its own copy (bench/footprint.py reports RSS and PSS).

The agent starts it (agent/zygote_client.py) with one end of a SOCK_SEQPACKET socketpair. A request is one
message: JSON {"argv": [...], "groups": [...]} with the worker's descriptors as SCM_RIGHTS; "{0}", "{1}"... in
argv name the descriptors in the order they came. The forked child writes its pid to each `cgroup.procs` file
before it runs anything else (as join_argv's shell does before exec), then runs agent/worker_process.main.
Replies: {"pid": N} with a pidfd of the child (the agent signals and watches it by that, never by a pid that may
be reused), or {"error": "..."}; whenever a child exits: {"exited": N, "code": C} (C < 0: killed by signal -C).

Life: the zygote dies with the agent (PR_SET_PDEATHSIG) and exits when the agent closes its socket; its workers
die with it in turn (their own PDEATHSIG, agent/worker_process.py). It is not threaded and never runs an event
loop, so forking it is safe, unlike forking the agent (threads: control, admin scrape, netlink).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import sys
import traceback
from typing import Any, NoReturn

MAX_FDS = 16
MAX_MESSAGE = 1 << 16
PR_SET_NAME = 15
COMM = b"pm-zygote"  # what `ps`/the bench see for a zygote forked from the agent
WORKER_COMM_PREFIX = "pmw:"  # and its workers: "pmw:<plane>" (their command line is the zygote's)
COMM_MAX = 15  # TASK_COMM_LEN - 1


def worker_comm(plane: str) -> str:
    """A forked worker's process name (/proc/PID/comm, `ps -o comm`): the only place its plane shows, as its
    command line is the zygote's. Cut at 15 bytes by the kernel: a plane name over 11 bytes is cut too."""
    return (WORKER_COMM_PREFIX + plane).encode()[:COMM_MAX].decode(errors="ignore")


def _plane_of(argv: list[str]) -> str:
    return argv[argv.index("--plane") + 1] if "--plane" in argv[:-1] else ""


def preload() -> None:
    """What every worker imports at start-up (tests/unit/test_worker_imports.py keeps it lean); worker_process
    first: it loads uvloop without OpenSSL (agent/lean_loop.py)."""
    import planemesh.agent.worker_process  # noqa: I001
    import planemesh.agent.proxy.accesslog
    import planemesh.agent.proxy.server  # noqa: F401


def recv_request(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One request and its descriptors; None when the agent closed the socket."""
    fds = array.array("i")
    data, ancdata, _flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return json.loads(data), list(fds)


def exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _set_name(name: bytes) -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, name, 0, 0, 0)


def _join_groups(groups: list[str]) -> None:
    pid = str(os.getpid()).encode()
    for procs in groups:
        with contextlib.suppress(OSError):  # as join_argv: a group that cannot be joined is reported by the agent
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)


def _run_child(request: dict[str, Any], fds: list[int], keep_closed: list[int]) -> None:
    """In the forked child: groups first, then the worker. Never returns."""
    code = 1
    try:
        _join_groups(list(request.get("groups", [])))
        _set_name(worker_comm(_plane_of([str(a) for a in request["argv"]])).encode())
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in keep_closed:
            with contextlib.suppress(OSError):
                os.close(fd)
        from planemesh.agent import worker_process

        worker_process.main([str(a).format(*fds) for a in request["argv"]])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([json.dumps(message).encode()], ancdata)


def _spawn(sock: socket.socket, request: dict[str, Any], fds: list[int], own: list[int]) -> None:
    try:
        pid = os.fork()
    except OSError as exc:
        _send(sock, {"error": f"fork: {exc}"})
        return
    if pid == 0:
        _run_child(request, fds, own)
    pidfd = os.pidfd_open(pid)  # before any waitpid: the pid cannot have been reused yet
    try:
        _send(sock, {"pid": pid}, [pidfd])
    finally:
        os.close(pidfd)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"exited": pid, "code": exit_code(status)})


def serve(sock: socket.socket) -> None:
    """Fork a worker per request, report exits, until the agent closes the socket."""
    import select

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    own = [sock.fileno(), wake_r, wake_w]
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
            _reap(sock)
        if sock in readable:
            got = recv_request(sock)
            if got is None:
                return
            request, fds = got
            try:
                _spawn(sock, request, fds, own)
            finally:
                for fd in fds:
                    os.close(fd)
            _reap(sock)


def run(sock: socket.socket) -> None:
    """Be the zygote on `sock` until the agent closes it."""
    from planemesh.agent.worker_process import die_with_parent

    die_with_parent()
    preload()
    gc.collect()
    gc.freeze()  # the preloaded objects go to a generation the children's collections never walk (no page writes)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the agent's to handle; SIGTERM ends us
    try:
        serve(sock)
    except (BrokenPipeError, ConnectionResetError):  # the agent is gone
        pass


def run_forked(fd: int) -> NoReturn:
    """In a child forked from the agent before it started any thread (agent/zygote_client.py Zygotes.prefork):
    keep stdio and `fd` only, name the process, and be the zygote. Never returns."""
    code = 1
    try:
        os.closerange(3, fd)
        os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
        _set_name(COMM)  # /proc/PID/comm; the command line stays the agent's
        run(socket.socket(fileno=fd))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--fd":
        raise SystemExit("usage: python -m planemesh.agent.zygote --fd N")
    run(socket.socket(fileno=int(args[1])))


if __name__ == "__main__":
    main()
