"""The agent's side of its netlink helper (netplanes/nl_helper.py): start it when a kernel change is asked for,
send the change, raise its error here, and stop it once idle, so pyroute2 is resident only while changes are made.

Calls are synchronous (the agent's control thread makes them, one at a time); a helper idle for `linger_s` is
closed by a timer (its socket closed: it exits), and the next call starts a new one (~0.3 s: pyroute2's import;
the agent prestarts the first one as it starts, so that import overlaps its own start-up).
The helper is started from the calling thread, so it lives in that thread's network namespace: use one
NetlinkHelper per namespace, as one Datapath.
"""

from __future__ import annotations

import array
import logging
import socket
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

from planemesh import cpickle as pickle
from planemesh import module_argv
from planemesh.netplanes.htb_plan import EgressOp, EgressPlan

log = logging.getLogger("planemesh.netplanes")
LINGER_S = 2.0  # idle this long, the helper exits (a burst of updates shares one helper)
REPLY_TIMEOUT_S = 30.0  # a helper that answers nothing by then is killed (the call fails, the next starts anew)
MAX_REPLY = 1 << 20


class NetlinkOpError(OSError):
    """The helper ran the operation and the kernel (or pyroute2) refused it; errno as the helper saw it."""


class NetlinkHelperError(RuntimeError):
    """The helper could not be started or did not answer."""


class NetlinkHelper:
    def __init__(self, linger_s: float = LINGER_S) -> None:
        self.linger_s = linger_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._timer: threading.Timer | None = None
        self.starts = 0  # helper processes started so far
        self.calls = 0

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def prestart(self) -> None:
        """Start the helper now without waiting for it (its ~0.3 s import overlaps the caller's start-up); it
        exits after `linger_s` if no call comes."""
        with self._lock:
            if self._sock is None:
                self._start()
                self._arm()

    def call(self, op: str, *args: Any, fds: Sequence[int] = ()) -> Any:
        """Run `op` (nl_helper.OPS) with `args` and the descriptors `fds`; its result, or NetlinkOpError."""
        with self._lock:
            self._cancel_timer()
            try:
                reply = self._exchange(pickle.dumps((op, args)), fds)
            finally:
                self._arm()
        status, *rest = reply
        if status == "ok":
            return rest[0]
        code, text = rest
        raise NetlinkOpError(code, f"{op}: {text}")

    def _exchange(self, payload: bytes, fds: Sequence[int]) -> tuple[Any, ...]:
        if self._sock is not None and self._proc is not None and self._proc.poll() is not None:
            self._stop()  # died while idle (killed, OOM): a fresh one answers; every operation is idempotent
        if self._sock is None:
            self._start()
        assert self._sock is not None
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._sock.sendmsg([payload], ancdata)
            data = self._sock.recv(MAX_REPLY)
            if not data:
                raise EOFError("the helper closed its socket")
            self.calls += 1
            return pickle.loads(data)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self._stop()
            raise NetlinkHelperError(f"netlink helper: {exc}") from exc

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = module_argv("planemesh.netplanes.nl_helper", "--fd", str(theirs.fileno()))
            self._proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise NetlinkHelperError(f"cannot start the netlink helper: {exc}") from exc
        finally:
            theirs.close()
        ours.settimeout(REPLY_TIMEOUT_S)
        self._sock = ours
        self.starts += 1
        log.debug("netlink helper started (pid %d)", self._proc.pid)

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()  # the helper reads EOF and exits
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _arm(self) -> None:
        if self._sock is None or self.linger_s < 0:
            return
        timer = threading.Timer(self.linger_s, self._idle)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle(self) -> None:
        with self._lock:
            if self._timer is threading.current_thread():
                self._timer = None
                self._stop()

    def close(self) -> None:
        with self._lock:
            self._cancel_timer()
            self._stop()


class HelperTc:
    """TcHooks (ebpf/tc_hooks.py) run by the netlink helper; the program fds travel with each request."""

    def __init__(self, helper: NetlinkHelper) -> None:
        self.helper = helper

    def attach(self, ifindex: int, prog_fd: int, name: str) -> bool:
        return bool(self.helper.call("tc.attach", ifindex, name, fds=[prog_fd]))

    def detach(self, ifindex: int, remove_clsact: bool) -> None:
        self.helper.call("tc.detach", ifindex, remove_clsact)

    def egress_apply(self, ifindex: int, plan: EgressPlan, prog_fd: int) -> list[EgressOp]:
        return list(self.helper.call("egress.apply", ifindex, plan, fds=[prog_fd]))

    def egress_remove(self, ifindex: int) -> bool:
        return bool(self.helper.call("egress.remove", ifindex))


__all__ = ["HelperTc", "NetlinkHelper", "NetlinkHelperError", "NetlinkOpError"]
