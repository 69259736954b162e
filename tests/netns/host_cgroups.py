"""Test cgroups for host mode: made below the machine's cgroup v2 mount under a per-run name, removed even
on failure; and client processes started inside one (in a lab namespace)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from planemesh.ebpf.host_redirect import cgroup2_mounts
from planemesh.labs.netns import exec_argv

TIMEOUT = 10.0


def cgroup2_root() -> str:
    mounts = cgroup2_mounts()
    assert mounts, "these tests need a cgroup v2 hierarchy mounted"
    return mounts[0]


@contextlib.contextmanager
def temporary_cgroup(name: str) -> Iterator[str]:
    """A fresh cgroup `<cgroup2 mount>/<name>`; on exit its processes go back to the root and it is removed."""
    root = cgroup2_root()
    path = os.path.join(root, name)
    os.mkdir(path)
    try:
        yield path
    finally:
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs")) as f:
                for pid in f.read().split():
                    with contextlib.suppress(OSError), open(os.path.join(root, "cgroup.procs"), "w") as out:
                        out.write(pid)
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY: a process was still leaving
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def joiner(cgroup: str | None) -> Callable[[], None] | None:
    """A preexec_fn that moves the child into `cgroup` before it execs (None: stay where we are)."""
    if cgroup is None:
        return None

    def join() -> None:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write("0")  # "0": the writing process itself

    return join


HTTP_CLIENT = """
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=float(sys.argv[4]))
try:
    conn.request("GET", sys.argv[3])
    resp = conn.getresponse()
    print(json.dumps({"status": resp.status, "body": resp.read().decode("latin-1")}))
except OSError as exc:
    print(json.dumps({"status": 0, "error": repr(exc)}))
"""


def http_get(ns: str, cgroup: str | None, address: str, port: int, path: str = "/", timeout: float = 5.0) -> dict:
    """GET from a new process in `ns` (inside `cgroup` if given). Returns {"status", "body"|"error"};
    status 0 when the connection failed. A 200 from a lab echo server has "seen": what it saw."""
    proc = subprocess.run(
        exec_argv(ns, [sys.executable, "-c", HTTP_CLIENT, address, str(port), path, str(timeout)]),
        capture_output=True,
        text=True,
        timeout=timeout + TIMEOUT,
        preexec_fn=joiner(cgroup),
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    if result["status"] == 200:
        with contextlib.suppress(ValueError):
            result["seen"] = json.loads(result["body"])
    return result
