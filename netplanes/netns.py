"""Enter a named network namespace (`ip netns` names: /var/run/netns/NAME) without pyroute2."""

from __future__ import annotations

import ctypes
import os

NETNS_RUN_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000


def setns(name: str) -> None:
    """Move the calling thread into the named network namespace (call it while the process has one thread, so
    every thread and child started later is there too). OSError if it does not exist or cannot be entered."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a network namespace name: {name!r}")
    fd = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


__all__ = ["setns"]
