"""Where a process's RSS goes: /proc/PID/smaps summed by mapping (a shared object, [heap], anonymous memory),
for bench/footprint.py --by-mapping. Anonymous memory is CPython's object arenas and malloc's large blocks;
[heap] is malloc's main arena; a file is its resident pages (text touched, relocated data)."""

from __future__ import annotations

import collections
import contextlib
import os


def rss_by_mapping(pid: int) -> collections.Counter[str]:
    """kB of RSS per mapping name (file basename, [heap], [stack], [anon]...); empty when the process is gone."""
    out: collections.Counter[str] = collections.Counter()
    name = "[anon]"
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=6)
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line: addr perms off dev inode path
                name = os.path.basename(head[5].strip()) if len(head) > 5 else "[anon]"
            elif head[0] == "Rss:":
                out[name] += int(head[1])
    return out


def report(processes: dict[str, int], top: int = 12) -> list[str]:
    """The `top` largest mappings of each process, MB."""
    lines = ["RSS by mapping (MB; /proc/PID/smaps):"]
    for label, pid in processes.items():
        by = rss_by_mapping(pid)
        total = sum(by.values())
        lines.append(f"  {label} ({total / 1024:.1f}): " + ", ".join(
            f"{name} {kb / 1024:.1f}" for name, kb in by.most_common(top)))  # fmt: skip
    return lines
