"""Netlink plumbing shared by every kernel-control module."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pyroute2 import IPRoute


@contextlib.contextmanager
def ipr_or_new(ipr: IPRoute | None) -> Iterator[IPRoute]:
    """The caller's IPRoute (batching calls on one socket), or a fresh one closed afterwards.
    A fresh one belongs to the calling thread's network namespace."""
    if ipr is not None:
        yield ipr
        return
    with IPRoute() as own:
        yield own
