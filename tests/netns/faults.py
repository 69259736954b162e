"""Faults for the netns tests: find a plane's worker processes, stop and continue them, kill them."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

from planemesh.labs import netns as ns_tools
from planemesh.labs import procs


def worker_pids(agent_pid: int, plane: str) -> list[int]:
    """The agent's live worker processes serving `plane`, exec'd or forked by its zygote (labs/procs.py)."""
    return procs.worker_pids(agent_pid, plane)


def wait_worker(agent_pid: int, plane: str, timeout: float = 20.0, not_pid: int | None = None) -> int:
    """A worker pid of `plane` (other than `not_pid`), waiting for one to exist."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in worker_pids(agent_pid, plane) if p != not_pid]
        if pids:
            return pids[0]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no worker for plane {plane} under agent {agent_pid}")
        time.sleep(0.1)


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP `pid` for the duration of the block (SIGCONT after, if it still exists)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def flap(ns: str, ifname: str, down_s: float) -> None:
    """Set `ifname` in `ns` down, then up again after `down_s`. The kernel drops the routes through a link set
    down; the lab installed the node's routes to its pods once (as a CNI would), so they are put back here as
    the node's network manager would, and only those: whatever planemesh installs must come back by itself."""
    routes = {
        family: ns_tools.run(ns, ["ip", family, "route", "show", "dev", ifname, "proto", "static"]).stdout.splitlines()
        for family in ("-4", "-6")
    }
    ns_tools.run(ns, ["ip", "link", "set", "dev", ifname, "down"])
    time.sleep(down_s)
    ns_tools.run(ns, ["ip", "link", "set", "dev", ifname, "up"])
    for family, lines in routes.items():
        for line in lines:
            ns_tools.run(ns, ["ip", family, "route", "replace", *line.split(), "dev", ifname, "proto", "static"])
