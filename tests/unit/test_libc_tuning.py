"""The agent's malloc arena limit (agent/libc_tuning.py): threads that allocate at once share one arena."""

from __future__ import annotations

import os
import subprocess
import sys

THREADS = """
import ctypes, sys, threading
from planemesh.agent.libc_tuning import limit_malloc_arenas
print(limit_malloc_arenas() if sys.argv[1] == "limit" else "-", flush=True)
barrier = threading.Barrier(4)
def work():
    barrier.wait()
    keep = [bytearray(200) for _ in range(20000)]  # malloc'd, small blocks, all threads at once
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


def _arenas(mode: str, env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", THREADS, mode], capture_output=True, text=True, timeout=60,
                         check=True, env=env)  # fmt: skip
    return out.stdout.strip(), sum(line.startswith("Arena ") for line in out.stderr.splitlines())


def test_agent_threads_share_one_malloc_arena_unless_the_environment_says_otherwise() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert _arenas("limit", env) == ("True", 1)
    assert _arenas("none", env)[1] > 1  # glibc's default: the allocating threads got arenas of their own
    assert _arenas("limit", {**env, "MALLOC_ARENA_MAX": "4"})[0] == "False"
