"""The test run's watchdog (tests/support/watchdog.py): a hang ends with the stacks and status 1; disarmed, it
stays quiet. Real child processes held open by a thread nobody joins, as the CI run that hung at exit was."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

WATCHDOG = Path(__file__).resolve().parents[1] / "support" / "watchdog.py"

CHILD = textwrap.dedent("""
    import importlib.util, threading, time
    spec = importlib.util.spec_from_file_location("watchdog", {path!r})
    watchdog = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(watchdog)
    disarmed = watchdog.arm(0.5, "held open")
    threading.Thread(target=time.sleep, args=({hold},), name="never-joined").start()
    {after}
    """)


def _child(hold: float, after: str = "") -> subprocess.CompletedProcess[str]:
    code = CHILD.format(path=str(WATCHDOG), hold=hold, after=after)
    return subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=30)


def test_a_process_held_open_exits_with_the_stacks() -> None:
    done = _child(hold=60)
    assert done.returncode == 1
    assert "*** held open: every thread's stack, then exit 1 ***" in done.stderr
    assert "never-joined (not daemon)" in done.stderr
    assert "in _shutdown" in done.stderr  # the main thread's stack: waiting at exit for the thread


def test_a_disarmed_watchdog_stays_quiet() -> None:
    done = _child(hold=1.0, after="disarmed.set()")
    assert (done.returncode, done.stderr) == (0, "")
