"""Process-wide glibc settings for the agent, made before its first thread starts (agent/cli.py main)."""

from __future__ import annotations

import ctypes
import os

M_ARENA_MAX = -8  # glibc malloc.h
ARENAS = 1


def limit_malloc_arenas(count: int = ARENAS) -> bool:
    """glibc gives threads that allocate at once arenas of their own (up to 8 per core), each keeping its own
    free pages: ~1.2 MB of the agent's RSS for its few threads (control, admin scrape, netlink), none of which
    allocates on a hot path (bench/footprint.py). MALLOC_ARENA_MAX in the environment wins. True when set."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, count))
    except (OSError, AttributeError):  # not glibc
        return False
