"""The isolation bench's ledger of one CPU (bench/plane_isolation_cpu.py), with the real scheduler: a BPF program
on sched_switch charges each process the time it ran there, so a process pinned to that CPU and spinning is
named with the time it ran, and the labels together account for the whole measurement."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench.plane_isolation_cpu import IDLE, CpuLedger

pytestmark = pytest.mark.bpf


def test_a_spinner_pinned_to_the_cpu_is_charged_its_run_time() -> None:
    cpu = max(os.sched_getaffinity(0))
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    ledger = CpuLedger(cpu, lambda: {spin.pid: "spinner"})
    try:
        os.sched_setaffinity(spin.pid, {cpu})
        assert ledger.method.startswith("sched_switch BPF")
        ledger.start()
        time.sleep(1.0)
        got = ledger.stop()
    finally:
        spin.kill()
        spin.wait()
        ledger.close()
    print(f"CPU {cpu}, ms/s: {got}")
    assert got.get("spinner", 0) > 150  # it shares the CPU with whatever else runs there, but it never sleeps
    assert got.get(IDLE, 0) < 850
    assert 850 < sum(got.values()) < 1100  # every switch is charged to someone: the labels cover the second
