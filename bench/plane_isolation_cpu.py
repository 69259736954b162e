"""Who ran on the protected plane's CPU during a probe of bench plane_isolation, and keeping the bench itself off it.

On a shared machine a probe's p99 moves with whatever else the scheduler puts on the protected CPU: a neighbour's
test run, the bench's own process. `CpuLedger` attributes that CPU's time during each probe: with BPF (bcc), a
program on the `sched:sched_switch` tracepoint adds each stretch the CPU ran a process to that process's total
(kernel work done meanwhile, softirqs included, counts under the process it interrupted; idle is pid 0), exact to
the nanosecond and read in microseconds; without bcc it falls back to an estimate from /proc (each task's run
time counted on the CPU it last ran on). Each pid is named by what it is to the bench (`_label`): this bench's
groups, the agent and its workers, the kernel's threads, idle, or `others` (the rest of the machine: not
started by this bench).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.plane_isolation_lab import online_cpus
from planemesh.labs.procs import stat_fields

OTHERS, KERNEL, IDLE, BENCH = "others", "kernel", "idle", "bench"

# Run time per process on one CPU, from the scheduler's switches: at each switch on CPU the process switched out
# (the current one) is charged the time since the previous switch there. The task switched in is remembered so
# that stop() can charge it the time since the last switch (a lone spinner may not be switched out for seconds).
SCHED_PROGRAM = r"""
BPF_ARRAY(last_switch, u64, 1);
BPF_ARRAY(running_tid, u32, 1);
BPF_HASH(run_ns, u32, u64, 65536);
TRACEPOINT_PROBE(sched, sched_switch) {
    if (bpf_get_smp_processor_id() != CPU)
        return 0;
    int zero = 0;
    u64 now = bpf_ktime_get_ns();
    u64 *last = last_switch.lookup(&zero);
    if (!last)
        return 0;
    if (*last) {
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        u64 ran = now - *last;
        u64 *total = run_ns.lookup(&tgid);
        if (total)
            __sync_fetch_and_add(total, ran);
        else
            run_ns.update(&tgid, &ran);
    }
    *last = now;
    u32 next = args->next_pid;
    running_tid.update(&zero, &next);
    return 0;
}
"""


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
    os.sched_setaffinity(0, online_cpus())
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def process_tree() -> tuple[dict[int, int], dict[int, int]]:
    """(pid -> parent pid of every process now, thread id -> its process's pid)."""
    parents: dict[int, int] = {}
    threads: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents[int(entry)] = int(stat_fields(int(entry))[1])
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


SNAPSHOT_TRIES = 5  # reads of the ledger's maps before one not crossed by a switch is given up on
Labeller = Callable[[], dict[int, str]]  # pid -> label for this bench's processes (groups, agent, workers)


class CpuLedger:
    """ms per second of the protected CPU by label during one measurement (start() .. stop())."""

    def __init__(self, cpu: int, labels: Labeller, use_bpf: bool = True) -> None:
        self.cpu, self.labels = cpu, labels
        self._bpf = _sched_program(cpu) if use_bpf else None
        self._start: dict[int, tuple[int, int, int]] = {}
        self._t0_ns = 0

    @property
    def method(self) -> str:
        return (
            f"sched_switch BPF run times on CPU {self.cpu}" if self._bpf is not None else "/proc run times (estimate)"
        )

    def start(self) -> None:
        self._t0_ns = time.monotonic_ns()
        if self._bpf is not None:
            self._bpf[b"run_ns"].clear()
            # the window starts now, not at the CPU's last switch (bpf_ktime_get_ns is CLOCK_MONOTONIC)
            self._bpf[b"last_switch"][ctypes.c_int(0)] = ctypes.c_ulonglong(self._t0_ns)
        else:
            self._start = _task_times()

    def stop(self) -> dict[str, float]:
        """Label -> ms/s of the protected CPU; the labels of pids gone meanwhile are what `labels` said last."""
        by_pid: dict[int, float] = {}
        if self._bpf is not None:
            run_ns, last, running, now = self._bpf_snapshot()
            elapsed = max(1e-3, (now - self._t0_ns) / 1e9)  # the window ends at the snapshot
            for tid, ns in run_ns.items():
                by_pid[tid] = ns / 1e6 / elapsed
            if now > last:  # the task running now, since the CPU's last switch (or the window's start)
                by_pid[running] = by_pid.get(running, 0.0) + (now - last) / 1e6 / elapsed
        else:
            elapsed = max(1e-3, (time.monotonic_ns() - self._t0_ns) / 1e9)
            for tid, (_, run, cpu) in _task_times().items():
                if cpu == self.cpu:
                    by_pid[tid] = (run - self._start.get(tid, (0, 0, 0))[1]) / 1e6 / elapsed
        return _label(by_pid, self.labels(), *process_tree())

    def _bpf_snapshot(self) -> tuple[dict[int, int], int, int, int]:
        """(run ns by tid, the CPU's last switch, the tid running since, now), consistent: read again while the
        CPU switched meanwhile. A switch between reading the run times and the last switch charged a whole
        slice (hundreds of ms for a lone spinner) where neither read saw it."""
        bpf, zero = self._bpf, ctypes.c_int(0)
        assert bpf is not None
        for _ in range(SNAPSHOT_TRIES):
            last = bpf[b"last_switch"][zero].value
            running = bpf[b"running_tid"][zero].value
            run_ns = {key.value: ns.value for key, ns in bpf[b"run_ns"].items()}
            now = time.monotonic_ns()
            if bpf[b"last_switch"][zero].value == last:
                break
        return run_ns, last, running, now

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


def _sched_program(cpu: int) -> Any:
    """The sched_switch program for `cpu` (bcc compiles it: a few seconds, once), or None without bcc."""
    try:
        from bcc import BPF  # optional: without bcc the bench falls back to /proc
    except ImportError:
        return None
    return BPF(text=SCHED_PROGRAM.encode(), cflags=[f"-DCPU={cpu}"])


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
                cpu = int(stat_fields(int(entry), tid)[36])
                run = int(Path(f"/proc/{entry}/task/{tid}/schedstat").read_text().split()[0])
                found[int(tid)] = (int(entry), run, cpu)
    return found
