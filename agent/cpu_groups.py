"""Per-plane CPU cgroups for the proxy workers: each plane's workers share one cgroup with the plane's
`sla.cpu_weight`, so a plane that saturates its workers (or runs more of them) gets its weighted share of
the CPU and no more, and the other planes' workers are scheduled ahead of its backlog.

cgroup v2 (`cpu.weight`, 1..10000, default 100) when the cpu controller is on the unified hierarchy, else the
v1 cpu hierarchy (`cpu.shares` = weight * 1024 / 100). The groups live below the agent's own cgroup,
`<own>/planemesh-<pid>/plane-<name>`. The parent's own weight is the default weight times the number of
workers, so the agent as a whole competes with the node's other processes (the applications whose requests it
carries among them) exactly as its workers would without groups: the plane weights only redistribute the
agent's share between its planes. In v2 a cgroup that holds processes cannot hand controllers to
children; when the agent's own cgroup is not the root (a systemd service with `Delegate=cpu`), the agent
first moves itself into a leaf `<own>/agent`. Without a usable cpu controller the agent logs it once and runs
without weights: isolation between planes then rests on separate processes only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("planemesh.cpu")

V2_DEFAULT_WEIGHT = 100
V1_SHARES_PER_WEIGHT = 1024 / V2_DEFAULT_WEIGHT


def v1_shares(weight: int) -> int:
    """cgroup v1 cpu.shares equivalent of a v2 cpu.weight (100 -> 1024, the v1 default)."""
    return max(2, min(262144, round(weight * V1_SHARES_PER_WEIGHT)))


def parse_mounts(text: str) -> tuple[Path | None, Path | None]:
    """(cgroup2 mount, v1 mount carrying the cpu controller) from /proc/self/mounts."""
    v2 = v1_cpu = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mount, fstype, options = fields[1], fields[2], fields[3].split(",")
        if fstype == "cgroup2" and v2 is None:
            v2 = Path(mount)
        elif fstype == "cgroup" and "cpu" in options and v1_cpu is None:
            v1_cpu = Path(mount)
    return v2, v1_cpu


def own_cgroup(text: str, v1_controller: str | None) -> str:
    """This process's cgroup path from /proc/self/cgroup: the v2 entry ("0::/x"), or the v1 line listing
    `v1_controller`."""
    for line in text.splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if v1_controller is None and hierarchy == "0":
            return path
        if v1_controller is not None and v1_controller in controllers.split(","):
            return path
    return "/"


@dataclass(frozen=True)
class Hierarchy:
    base: Path  # <mount>/<own cgroup>/planemesh-<pid>
    version: int  # 1 or 2

    def weight_file(self, group: Path) -> Path:
        return group / ("cpu.weight" if self.version == 2 else "cpu.shares")

    def weight_value(self, weight: int) -> str:
        return str(weight if self.version == 2 else v1_shares(weight))


class CpuGroups:
    """The agent's per-plane CPU groups (absent when no cpu controller can be used)."""

    def __init__(self, hierarchy: Hierarchy | None) -> None:
        self.hierarchy = hierarchy
        self._groups: dict[str, Path] = {}
        self._applied: dict[str, tuple[int, int]] = {}  # plane -> (weight, workers) last written

    @classmethod
    def create(cls, instance: str | None = None) -> CpuGroups:
        name = f"planemesh-{instance or os.getpid()}"
        try:
            return cls(_prepare(name))
        except OSError as exc:
            log.warning("per-plane CPU weights disabled: %s", exc)
            return cls(None)

    @property
    def enabled(self) -> bool:
        return self.hierarchy is not None

    def set_plane(self, plane: str, weight: int, workers: int = 1) -> None:
        """Create the plane's group if needed and set its weight (`workers`: how many processes it holds)."""
        if self.hierarchy is None or self._applied.get(plane) == (weight, workers):
            return  # called with every snapshot: cgroup files are written only when something changed
        group = self._groups.get(plane)
        try:
            if group is None:
                group = self.hierarchy.base / f"plane-{plane}"
                group.mkdir(exist_ok=True)
                self._groups[plane] = group
            self._write_weight(group, weight)
            self._applied[plane] = (weight, workers)
            total_workers = sum(count for _, count in self._applied.values())
            self._write_weight(self.hierarchy.base, min(10000, V2_DEFAULT_WEIGHT * total_workers))
        except OSError as exc:
            log.warning("plane %s: cannot set CPU weight %d: %s", plane, weight, exc)

    def _write_weight(self, group: Path, weight: int) -> None:
        assert self.hierarchy is not None
        self.hierarchy.weight_file(group).write_text(self.hierarchy.weight_value(weight))

    def add(self, plane: str, pid: int) -> None:
        group = self._groups.get(plane)
        if group is None:
            return
        try:
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:  # the worker may already be gone: its supervisor restarts it
            log.warning("plane %s: cannot move worker %d into %s: %s", plane, pid, group, exc)

    def weight(self, plane: str) -> int | None:
        group = self._groups.get(plane)
        if group is None or self.hierarchy is None:
            return None
        return int(self.hierarchy.weight_file(group).read_text())

    def remove_plane(self, plane: str) -> None:
        group = self._groups.pop(plane, None)
        self._applied.pop(plane, None)
        if group is not None:
            _rmdir(group)

    def close(self) -> None:
        for plane in list(self._groups):
            self.remove_plane(plane)
        if self.hierarchy is not None:
            _rmdir(self.hierarchy.base)


def _rmdir(group: Path) -> None:
    """Remove a cgroup once its (exiting) processes are gone; a leftover empty group is harmless."""
    import time

    for _ in range(20):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    log.warning("cgroup %s still busy; left in place", group)


def remove_stale_groups(parent: Path) -> list[Path]:
    """Remove the groups of agents that died without cleaning up (SIGKILL): `planemesh-<pid>` whose pid is
    gone and whose plane groups hold no process. Returns what was removed."""
    removed = []
    for group in parent.glob("planemesh-*"):
        pid = group.name.removeprefix("planemesh-")
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        try:
            for child in group.iterdir():
                if child.is_dir():
                    child.rmdir()  # fails (busy) while a process is still in it: then the group stays
            group.rmdir()
            removed.append(group)
        except OSError:
            continue
    return removed


def _prepare(name: str) -> Hierarchy:
    v2, v1_cpu = parse_mounts(Path("/proc/self/mounts").read_text())
    proc_cgroup = Path("/proc/self/cgroup").read_text()
    if v2 is not None and "cpu" in (v2 / "cgroup.controllers").read_text().split():
        return _prepare_v2(v2, own_cgroup(proc_cgroup, None), name)
    if v1_cpu is not None:
        base = v1_cpu / own_cgroup(proc_cgroup, "cpu").lstrip("/") / name
        remove_stale_groups(base.parent)
        base.mkdir(exist_ok=True)
        return Hierarchy(base, 1)
    raise OSError("no cgroup cpu controller (neither cgroup v2 nor a v1 cpu hierarchy is mounted)")


def _enable_cpu(group: Path) -> None:
    (group / "cgroup.subtree_control").write_text("+cpu")


def _prepare_v2(mount: Path, own: str, name: str) -> Hierarchy:
    own_dir = mount / own.lstrip("/")
    try:
        _enable_cpu(own_dir)
    except OSError:
        if own == "/":
            raise
        # Our own (delegated) cgroup holds processes: move them into a leaf, then delegate cpu below it.
        leaf = own_dir / "agent"
        leaf.mkdir(exist_ok=True)
        for pid in (own_dir / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (leaf / "cgroup.procs").write_text(pid)
        _enable_cpu(own_dir)
    base = own_dir / name
    remove_stale_groups(own_dir)
    base.mkdir(exist_ok=True)
    _enable_cpu(base)
    return Hierarchy(base, 2)
