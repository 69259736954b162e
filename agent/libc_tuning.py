"""Process-wide glibc malloc settings: the agent's arenas (before its first thread starts, agent/cli.py main) and
the HBONE node's thresholds (agent/hbone/node.py). One mallopt wrapper for both."""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
ARENAS = 1

# glibc's allocator for the HBONE tunnel's transient buffers (256 KiB h2 frames, the TLS engine's plaintext and
# ciphertext chunks): with its defaults each such buffer is a fresh mmap or a re-grown heap top, page-faulted per
# use (322 k faults per 256 MiB tunnelled vs 8 k with these; 2-3x the CPU per GiB until glibc's own threshold
# adapts: docs/benchmarks.md, hbone3). Cost: up to TRIM of free heap kept by the node process.
MALLOC_MMAP_THRESHOLD = 1 << 20  # M_MMAP_THRESHOLD: allocations below this come from the heap
MALLOC_TRIM_THRESHOLD = 4 << 20  # M_TRIM_THRESHOLD: free heap top kept before it is returned to the kernel


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt; False where it is missing (not glibc) or refuses."""
    try:
        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (OSError, AttributeError):
        return False


def limit_malloc_arenas(count: int = ARENAS) -> bool:
    """glibc gives threads that allocate at once arenas of their own (up to 8 per core), each keeping its own
    free pages: ~1.2 MB of the agent's RSS for its few threads (control, admin scrape, netlink), none of which
    allocates on a hot path (bench/footprint.py). MALLOC_ARENA_MAX in the environment wins. True when set."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    return _mallopt(M_ARENA_MAX, count)


def tune_malloc() -> bool:
    """The HBONE node's two thresholds (above); False where mallopt is missing or refuses."""
    return _mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) and _mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
