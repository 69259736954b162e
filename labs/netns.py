"""Running things inside network namespaces without ever switching the caller's own namespace.

setns() applies to one thread: `call_in` runs a function in a fresh thread that entered the namespace,
so sockets, sysctl writes and netlink sockets it makes belong to that namespace. Processes are
started with `ip netns exec`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pyroute2 import netns

T = TypeVar("T")
NETNS_DIR = "/run/netns"


def call_in(ns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn(*args, **kwargs) in a thread that lives in network namespace `ns`; return its result."""
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            netns.setns(ns)
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=runner, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def write_sysctls(ns: str, values: dict[str, str]) -> None:
    """Write /proc/sys/net/... keys (dotted, e.g. 'net.ipv4.ip_forward') inside `ns` only."""

    def write() -> None:
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)

    call_in(ns, write)


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def popen(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    return subprocess.Popen(exec_argv(ns, argv), **kwargs)


def run(
    ns: str, argv: Sequence[str], *, timeout: float = 30, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(exec_argv(ns, argv), timeout=timeout, check=check, **kwargs)


def list_namespaces() -> list[str]:
    return sorted(netns.listnetns())


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in(ns: str) -> list[int]:
    """Processes whose network namespace is `ns` (what `ip netns pids` does)."""
    target = _ns_inode(os.path.join(NETNS_DIR, ns))
    if target is None:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ns_inode(f"/proc/{entry}/ns/net") == target:
            found.append(int(entry))
    return found


def kill_all_in(ns: str, grace_s: float = 2.0) -> None:
    """SIGTERM every process in `ns`, then SIGKILL what is left after `grace_s`."""
    pids = pids_in(ns)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
            time.sleep(0.05)
        if not pids:
            return


def remove(ns: str) -> None:
    kill_all_in(ns)
    with contextlib.suppress(FileNotFoundError, OSError):
        netns.remove(ns)


def start_until(
    ns: str | None, argv: Sequence[str], ready: str, *, timeout: float = 20.0, **kwargs: Any
) -> subprocess.Popen:
    """Start argv (inside `ns`, or here when None) and wait until a stdout line contains `ready`.

    The process keeps its stdout pipe; lines after `ready` are drained by a thread so it never blocks.
    On timeout or early exit the process is killed and RuntimeError carries what it printed.
    """
    full = exec_argv(ns, argv) if ns else list(argv)
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, **kwargs)
    seen: list[str] = []
    found = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if len(seen) < 2000:
                seen.append(line.rstrip())
            if ready in line:
                found.set()
        found.set()

    threading.Thread(target=reader, daemon=True, name=f"stdout-{argv[0]}").start()
    found.wait(timeout)
    if proc.poll() is not None or not any(ready in line for line in seen):
        proc.kill()
        proc.wait()
        tail = "\n".join(seen[-30:])
        raise RuntimeError(f"{' '.join(argv[:4])} did not become ready within {timeout}s:\n{tail}")
    proc.output_lines = seen  # type: ignore[attr-defined]
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Signal a process and wait for it (SIGKILL after `timeout`); returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
