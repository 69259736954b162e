"""A hung test run ends with every thread's stack and exit status 1, never by running out CI's clock in silence.

pytest-timeout interrupts one test once; a hang after that (a cancelled task that never ends inside asyncio.run's
clean-up, a thread nobody joins at exit) had nothing left to stop it, and CI saw only its own 90-minute limit.
`arm(seconds, why)` starts a daemon thread that, unless disarmed, prints `why` and the stacks to the terminal
(pytest's capture suspended first, when given) and `os._exit(1)`s."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
from typing import Any

EXIT_STATUS = 1


def arm(seconds: float, why: str, capture: Any = None) -> threading.Event:
    """Fire after `seconds` unless the returned event is set. `capture`: pytest's capture manager, suspended
    before writing so the stacks reach the terminal instead of a test's captured output."""
    disarmed = threading.Event()

    def fire() -> None:
        if disarmed.wait(seconds):
            return
        if capture is not None:
            try:
                capture.suspend_global_capture(in_=True)
            except Exception:  # best effort: the stacks still go to file descriptor 2
                pass
        names = ", ".join(f"{t.name}{'' if t.daemon else ' (not daemon)'}" for t in threading.enumerate())
        os.write(2, f"\n*** {why}: every thread's stack, then exit {EXIT_STATUS} ***\nthreads: {names}\n".encode())
        faulthandler.dump_traceback(file=sys.__stderr__ or 2, all_threads=True)
        os._exit(EXIT_STATUS)

    threading.Thread(target=fire, name="test-watchdog", daemon=True).start()
    return disarmed
