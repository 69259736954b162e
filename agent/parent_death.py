"""A worker's parent-death signal, set before its interpreter starts, so that the worker needs no ctypes for the
prctl (~0.35 MB of RSS per worker, docs/benchmarks.md "Lean 5").

PR_SET_PDEATHSIG survives execve (except into a set-user-ID or file-capability binary, which python is not), so
the agent execs each worker through util-linux's `setpriv --pdeathsig TERM --` (util-linux 2.33+), which sets it
and execs python in the same process; the "parent" is still the agent's thread that forked it, as when the worker
set it itself. Calling prctl between fork and exec from Python (Popen's preexec_fn) would run Python code in a
fork of a threaded process (agent/zygote.py says why not). Without a setpriv that knows --pdeathsig the worker
sets it itself with ctypes, as before (agent/worker_process.py die_with_parent)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

SETPRIV = "setpriv"
SETPRIV_ARGS = ("--pdeathsig", "TERM", "--")


def find_program(name: str) -> str | None:
    """`name` on PATH, as the shell finds it (shutil.which would cost the agent ~0.45 MB: test_agent_imports)."""
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(folder or ".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


@functools.cache
def exec_prefix() -> tuple[str, ...]:
    """What goes before a worker's argv so that it starts with PDEATHSIG=SIGTERM set; () when this host's setpriv
    cannot (missing, or older than util-linux 2.33): the worker then sets it itself. Probed once per agent."""
    setpriv = find_program(SETPRIV)
    if setpriv is None:
        return ()
    try:
        probe = subprocess.run([setpriv, *SETPRIV_ARGS, sys.executable, "-I", "-S", "-c", ""], capture_output=True,
                               timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return (setpriv, *SETPRIV_ARGS) if probe.returncode == 0 else ()
