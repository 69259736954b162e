"""Find an agent's processes from /proc (tests, benches): its zygote and its plane workers, exec'd or forked.

An exec'd worker runs `python -m planemesh.agent.worker_process --plane P ...` as the agent's child; a worker forked
by the zygote (agent/zygote.py, the default) is the zygote's child, carries the zygote's command line and names its
plane in its process name (`pmw:P`, agent/zygote.py worker_comm).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from planemesh.agent.zygote import COMM, WORKER_COMM_PREFIX, worker_comm

WORKER_MODULE = b"planemesh.agent.worker_process"
ZYGOTE_MODULE = b"planemesh.agent.zygote"


def stat_fields(pid: int, tid: int | str | None = None) -> list[str]:
    """The fields of /proc/PID/stat (of thread `tid`'s, /proc/PID/task/TID/stat, when given) after the command
    name: comm may hold spaces and parentheses, the fields after the last ')' are fixed (state, ppid, ...)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    return Path(path).read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """Live (non-zombie) children of `pid`, from every pid's ppid."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat_fields(int(entry))
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return sorted(found)


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def is_zygote(pid: int) -> bool:
    """Forked from the agent (named pm-zygote) or exec'd (`python -m planemesh.agent.zygote`, a restarted one)."""
    return comm(pid) == COMM.decode() or ZYGOTE_MODULE in cmdline(pid)


def worker_plane(pid: int) -> str | None:
    """The plane a worker process serves (None: not a worker). A forked worker's plane is its process name's
    tail, cut at 11 bytes for longer plane names (`worker_pids` compares it so)."""
    name = comm(pid)
    if name.startswith(WORKER_COMM_PREFIX):
        return name[len(WORKER_COMM_PREFIX) :]
    argv = cmdline(pid)
    if WORKER_MODULE in argv and b"--plane" in argv[:-1]:
        return argv[argv.index(b"--plane") + 1].decode()
    return None


def zygotes(agent_pid: int) -> list[int]:
    return [pid for pid in children(agent_pid) if is_zygote(pid)]


def worker_pids(agent_pid: int, plane: str | None = None) -> list[int]:
    """The agent's live workers (of `plane`, or all): its exec'd children and its zygotes' children."""
    candidates = []
    for pid in children(agent_pid):
        candidates += children(pid) if is_zygote(pid) else [pid]
    found = []
    for pid in candidates:
        served = worker_plane(pid)
        if served is not None and (plane is None or served == plane or comm(pid) == worker_comm(plane)):
            found.append(pid)
    return sorted(found)


def workers_by_plane(agent_pid: int) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for pid in worker_pids(agent_pid):
        plane = worker_plane(pid)
        if plane is not None:
            found.setdefault(plane, []).append(pid)
    return found


__all__ = ["children", "cmdline", "comm", "is_zygote", "worker_pids", "worker_plane", "workers_by_plane", "zygotes"]
