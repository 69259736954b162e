"""Who ran on the protected plane's CPU during a probe of bench plane_isolation, and keeping the bench itself off it.

On a shared machine a probe's p99 moves with whatever else the scheduler puts on the protected CPU: a neighbour's
test run, the bench's own process. `CpuLedger` attributes that CPU's time during each probe: with perf (the
`cpu-clock` samples of that one CPU, by pid; kernel work done on behalf of a task, softirqs included, counts under
the task it interrupted) it is exact to the sampling; without perf it falls back to an estimate from /proc
(each task's run time counted on the CPU it last ran on). Each pid is named by what it is to the bench
(`label`): this bench's groups, the agent and its workers, the kernel's threads, idle, or `others` (the rest of
the machine: not started by this bench).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from planemesh.model.plane_limits import parse_cpu_list

PERF = shutil.which("perf")
PERF_HZ = 499  # samples per second of the one CPU: ~1,000 per 2 s probe, 2 ms per sample
OTHERS, KERNEL, IDLE, BENCH = "others", "kernel", "idle", "bench"


@contextlib.contextmanager
def off_cpu(cpu: int) -> Iterator[None]:
    """This process (and what it starts, unless that joins a pinned group) keeps off `cpu`: the bench's own
    Python (waiting for its children, scanning /proc) must not run on the CPU whose plane it measures."""
    everything = os.sched_getaffinity(0)
    rest = everything - {cpu}
    if rest:
        os.sched_setaffinity(0, rest)
    try:
        yield
    finally:
        os.sched_setaffinity(0, everything)


@contextlib.contextmanager
def any_cpu() -> Iterator[None]:
    """Children started inside run wherever the node lets them (the proxies under test: not pinned by the bench)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _online())
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _online() -> set[int]:
    return set(parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text()))


def _stat_fields(path: Path) -> list[str]:
    """The fields of a /proc stat file after the command name (which may hold spaces and parentheses)."""
    text = path.read_text()
    return text[text.rindex(")") + 2 :].split()


def process_tree() -> tuple[dict[int, int], dict[int, int]]:
    """(pid -> parent pid of every process now, thread id -> its process's pid)."""
    parents: dict[int, int] = {}
    threads: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry)] = int(_stat_fields(Path(f"/proc/{entry}/stat"))[1])
                threads.update((int(tid), int(entry)) for tid in os.listdir(f"/proc/{entry}/task"))
    return parents, threads


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """`root` and every process below it."""
    ours = {root}
    for pid in sorted(parents):
        chain, cur = [], pid
        while cur not in ours and cur > 2 and cur in parents and len(chain) < 64:
            chain.append(cur)
            cur = parents[cur]
        if cur in ours:
            ours.update(chain)
    return ours


Labeller = Callable[[], dict[int, str]]  # pid -> label for this bench's processes (groups, agent, workers)


class CpuLedger:
    """ms per second of the protected CPU by label during one measurement (start() .. stop())."""

    def __init__(self, cpu: int, labels: Labeller, use_perf: bool = True) -> None:
        self.cpu, self.labels = cpu, labels
        self.perf = PERF if use_perf else None
        self._proc: subprocess.Popen | None = None
        self._data = ""
        self._start: dict[int, tuple[int, int]] = {}
        self._t0 = 0.0

    @property
    def method(self) -> str:
        return f"perf cpu-clock samples of CPU {self.cpu}" if self.perf else "/proc run times (estimate)"

    def start(self) -> None:
        self._t0 = time.monotonic()
        if self.perf:
            fd, self._data = tempfile.mkstemp(prefix="pm-iso-perf-", suffix=".data")
            os.close(fd)
            argv = [self.perf, "record", "-q", "-e", "cpu-clock", "-C", str(self.cpu), "-F", str(PERF_HZ), "-o",
                    self._data]  # fmt: skip
            self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.1)  # perf opens its events before the probe starts
        else:
            self._start = _task_times()

    def stop(self) -> dict[str, float]:
        """Label -> ms/s of the protected CPU; the labels of pids gone meanwhile are what `labels` said last."""
        names = self.labels()
        tree = process_tree()
        if self._proc is None:
            elapsed = max(1e-3, time.monotonic() - self._t0)
            end = _task_times()
            by_pid: dict[int, float] = {}
            for tid, (_, run, cpu) in end.items():
                if cpu == self.cpu:
                    by_pid[tid] = (run - self._start.get(tid, (0, 0, 0))[1]) / 1e6 / elapsed
            return _label(by_pid, names, *tree)
        self._proc.send_signal(signal.SIGINT)
        self._proc.wait(30)
        self._proc = None
        try:
            return _label(perf_ms_per_s(self.perf or "perf", self._data), names, *tree)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self._data)


def perf_ms_per_s(perf: str, data: str) -> dict[int, float]:
    """pid -> ms/s from a `perf record -C CPU` file: each process's share of the CPU's samples (idle: pid 0).
    By process, not thread: a probe's worker thread is gone when the ledger names the pids."""
    out = subprocess.run(
        [perf, "script", "-i", data, "-F", "pid"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    samples = Counter(int(word) for word in out.split() if word.isdigit())
    total = sum(samples.values())
    return {pid: n * 1000 / total for pid, n in samples.items()} if total else {}


def _label(
    by_tid: dict[int, float], names: dict[int, str], parents: dict[int, int], threads: dict[int, int]
) -> dict[str, float]:
    ours = descendants(os.getpid(), parents)
    out: dict[str, float] = {}
    for tid, ms in by_tid.items():
        pid = threads.get(tid, tid)
        named = _named(pid, names, parents)
        if tid == 0:
            label = IDLE
        elif named is not None:
            label = named
        elif pid in ours:
            label = BENCH
        elif pid == 2 or parents.get(pid) == 2:
            label = KERNEL
        else:
            label = OTHERS  # not ours, or gone before stop(): a neighbour's short-lived process
        out[label] = out.get(label, 0.0) + ms
    return out


def _named(pid: int, names: dict[int, str], parents: dict[int, int]) -> str | None:
    """The label of `pid` or of its nearest named ancestor (a proxy's launcher is named, the proxy is its child)."""
    for _ in range(64):
        if pid in names:
            return names[pid]
        pid = parents.get(pid, 0)
        if pid <= 2:
            return None
    return None


def _task_times() -> dict[int, tuple[int, int, int]]:
    """tid -> (pid, run time ns, the CPU it last ran on) of every thread now."""
    found: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            for tid in os.listdir(f"/proc/{entry}/task"):
                cpu = int(_stat_fields(Path(f"/proc/{entry}/task/{tid}/stat"))[36])
                run = int(Path(f"/proc/{entry}/task/{tid}/schedstat").read_text().split()[0])
                found[int(tid)] = (int(entry), run, cpu)
    return found
