"""An exec'd worker's PR_SET_PDEATHSIG is set by `setpriv` between the agent's fork and the worker's python
(agent/parent_death.py), so the worker loads no ctypes (~0.35 MB of RSS each). The mechanism for real: a process
started through the prefix gets SIGTERM when its parent dies, one started without it lives on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from planemesh.agent import parent_death
from planemesh.agent.parent_death import exec_prefix

CHILD = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1], 'w').write('term'), sys.exit(0)))\n"
    "print('up', flush=True)\ntime.sleep(60)\n"
)
# The parent starts the child, says its pid once the child runs, and dies without a word to it.
PARENT = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen([*sys.argv[2:], sys.executable, '-c', {child!r}, sys.argv[1]], stdout=subprocess.PIPE,\n"
    "                         stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "child.stdout.readline()\nprint(child.pid, flush=True)\nos._exit(0)\n"
)


def _orphan(marker: Path, prefix: tuple[str, ...]) -> int:
    code = PARENT.format(child=CHILD)
    out = subprocess.run([sys.executable, "-c", code, str(marker), *prefix], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    return int(out.stdout)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True  # dead, waiting for its new parent to reap it
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_a_process_started_through_the_prefix_gets_sigterm_when_its_parent_dies(tmp_path: Path) -> None:
    prefix = exec_prefix()
    assert prefix and Path(prefix[0]).name == "setpriv", "util-linux >= 2.33 is on this host and in the image"
    pid = _orphan(tmp_path / "with", prefix)
    assert _gone(pid), "the child outlived its parent"
    assert (tmp_path / "with").read_text() == "term"


def test_without_the_prefix_the_same_child_outlives_its_parent(tmp_path: Path) -> None:
    pid = _orphan(tmp_path / "without", ())
    try:
        assert not _gone(pid, timeout=1.0) and not (tmp_path / "without").exists()
    finally:
        os.kill(pid, signal.SIGKILL)


def test_no_prefix_where_setpriv_is_missing_or_does_not_know_pdeathsig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Then the worker sets it itself, with ctypes, as before (worker_process.die_with_parent)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    exec_prefix.cache_clear()
    try:
        assert exec_prefix() == ()  # missing
        old = tmp_path / parent_death.SETPRIV
        old.write_text("#!/bin/sh\necho 'setpriv: unrecognized option --pdeathsig' >&2\nexit 1\n")
        old.chmod(0o755)
        exec_prefix.cache_clear()
        assert exec_prefix() == ()  # util-linux < 2.33
    finally:
        exec_prefix.cache_clear()


def test_the_worker_takes_pdeathsig_set_or_self_and_nothing_else() -> None:
    from planemesh.agent.worker_process import parse_args

    base = ["--plane", "oam", "--control-fd", "3", "--upstream-mark", "1"]
    assert parse_args(base).pdeathsig == "self"
    assert parse_args([*base, "--pdeathsig", "set"]).pdeathsig == "set"
    with pytest.raises(SystemExit, match="bad value for --pdeathsig"):
        parse_args([*base, "--pdeathsig", "TERM"])
