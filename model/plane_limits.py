"""The pure parts of a plane group's cpuset and memory limits (sans-IO; agent/cpu_groups.py writes them).

`sla.cpus` is a kernel cpu list ("1", "0-1,3"), the syntax of `cpuset.cpus` and of
/sys/devices/system/cpu/online. The plane group's `memory.max` is the plane's per-worker cap
(`sla.memory_max_mb`, which each worker's overload manager sheds at) times its workers plus a margin, and
`memory.high` (reclaim and throttling: back-pressure before the OOM killer) is 90% of that.
"""

from __future__ import annotations

MAX_CPU = 8191  # Linux CONFIG_NR_CPUS is at most 8192: a larger number is a typo, and never a huge range
MIB = 1 << 20
HIGH_PERCENT = 90  # memory.high as a share of memory.max
# Margin per worker above its cap, for what the cgroup charges and a worker's own count does not see
# (socket buffers, page tables, slab): a quarter of the cap, at least 32 MiB. With it memory.high
# (0.9 x 1.25 = 1.125 x cap) lies above the worker's hard shed point (0.95 x cap), so the worker sheds
# before the kernel throttles it, with 17.5% of the cap left for kernel memory.
MARGIN_SHARE = 4
MARGIN_MIN_MB = 32


def parse_cpu_list(text: str) -> frozenset[int]:
    """The CPUs of a cpu list ("0-2,5"); ValueError saying what is wrong."""
    text = text.strip()
    if not text:
        raise ValueError("empty cpu list (leave the field out for no cpuset)")
    cpus: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        first, sep, last = item.partition("-")
        if not _is_number(first) or (sep and not _is_number(last)):
            raise ValueError(f"{item!r} is not a CPU number or range (a cpu list reads like 0-1,3)")
        low, high = int(first), int(last) if sep else int(first)
        if low > high:
            raise ValueError(f"{item!r}: the range runs backwards")
        if high > MAX_CPU:
            raise ValueError(f"CPU {high} is beyond any kernel's CPU numbers (0..{MAX_CPU})")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5


def format_cpu_list(cpus: frozenset[int] | set[int]) -> str:
    """The canonical cpu list of a set of CPUs: sorted, consecutive CPUs as ranges ("0-2,5")."""
    parts: list[str] = []
    ordered = sorted(cpus)
    start = prev = None
    for cpu in [*ordered, None]:
        if cpu is not None and prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    return ",".join(parts)


def check_cpus(spec: str, online: frozenset[int] | None) -> str:
    """`spec` as a canonical cpu list, checked against the node's online CPUs (None: unknown, syntax only).
    ValueError when it is malformed or names a CPU that is not online."""
    cpus = parse_cpu_list(spec)
    if online is not None and not cpus <= online:
        missing = format_cpu_list(cpus - online)
        raise ValueError(f"CPU {missing} not online on this node (online: {format_cpu_list(online)})")
    return format_cpu_list(cpus)


def group_memory(memory_max_mb: int, workers: int) -> tuple[int, int] | None:
    """(memory.max, memory.high) in bytes for a plane group; None for no limit (memory_max_mb 0)."""
    memory_max_mb = int(memory_max_mb)  # a YAML float (128.5) must not reach a cgroup file as "1.6e8"
    if memory_max_mb <= 0:
        return None
    per_worker_mb = memory_max_mb + max(MARGIN_MIN_MB, memory_max_mb // MARGIN_SHARE)
    total_mb = per_worker_mb * max(1, workers)
    return total_mb * MIB, total_mb * HIGH_PERCENT // 100 * MIB  # whole MiB: page-aligned, read back as written
