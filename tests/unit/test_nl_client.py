"""The agent's side of the netlink helper (netplanes/nl_client.py) with the real helper process: errors come back
as NetlinkOpError with their errno, a helper that died while idle is replaced by the next call, an idle one
exits after its linger time, close() ends it. (The kernel changes themselves: tests/bpf/
test_kernel_netlink_helper.py.)"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest

from planemesh.netplanes.nl_client import NetlinkHelper, NetlinkOpError


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_an_unknown_operation_is_refused_with_einval_and_the_helper_stays() -> None:
    helper = NetlinkHelper(linger_s=30)
    try:
        with pytest.raises(NetlinkOpError) as caught:
            helper.call("no.such.op", 1)
        assert caught.value.errno == errno.EINVAL and "no.such.op" in str(caught.value)
        pid = helper.pid
        assert pid is not None
        with pytest.raises(NetlinkOpError):  # bad arguments to a real operation: its error, not a dead helper
            helper.call("tc.detach")
        assert helper.pid == pid and helper.starts == 1
    finally:
        helper.close()
    assert helper.pid is None and _gone(pid)


def test_a_helper_that_died_while_idle_is_replaced_by_the_next_call() -> None:
    helper = NetlinkHelper(linger_s=30)
    try:
        with pytest.raises(NetlinkOpError):
            helper.call("no.such.op")
        first = helper.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert _gone(first)
        with pytest.raises(NetlinkOpError):  # answered by a new helper, not a broken pipe
            helper.call("no.such.op")
        assert helper.starts == 2 and helper.pid not in (None, first)
    finally:
        helper.close()


def test_an_idle_helper_exits_after_its_linger_time() -> None:
    helper = NetlinkHelper(linger_s=0.2)
    try:
        helper.prestart()
        pid = helper.pid
        assert pid is not None
        assert _gone(pid), "the idle helper is still there"
        with pytest.raises(NetlinkOpError):
            helper.call("no.such.op")
        assert helper.starts == 2
    finally:
        helper.close()
