"""Per-plane cgroups for the proxy workers: each plane's workers share one group carrying the plane's
`sla.cpu_weight`, so a plane that saturates its workers (or runs more of them) gets its weighted share of
the CPU and no more, and the other planes' workers are scheduled ahead of its backlog; `sla.cpus` pins them to
a cpu list (`cpuset.cpus`), and `sla.memory_max_mb` bounds their memory (`memory.max`, with `memory.high`
below it: reclaim and throttling before the OOM killer; the values come from model/plane_limits.py).

Each controller is used where the node has it: cgroup v2 when the controller is on the unified hierarchy
(`cpu.weight`, 1..10000, default 100), else its v1 hierarchy (`cpu.shares` = weight * 1024 / 100,
`cpuset.cpus` with the parent's `cpuset.mems`, `memory.limit_in_bytes` with `memory.soft_limit_in_bytes` as
the nearest v1 has to memory.high). The groups live below the agent's own cgroup,
`<own>/planemesh-<pid>/plane-<name>`. The parent's own weight is the default weight times the number of
workers, so the agent as a whole competes with the node's other processes (the applications whose requests it
carries among them) exactly as its workers would without groups: the plane weights only redistribute the
agent's share between its planes. In v2 a cgroup that holds processes cannot hand controllers to
children; when the agent's own cgroup is not the root (a systemd service with `Delegate=cpu cpuset memory`),
the agent first moves itself into a leaf `<own>/agent`. A controller the node does not offer is logged once
and its limits are not applied (isolation between planes then rests on separate processes only); a cpuset
or memory limit that the configuration asks for and that could not be applied is also logged per plane and
reported (`report()`: the `plane_groups` stats rows and the planemesh_plane_limit_applied gauge).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planemesh.model.plane_limits import format_cpu_list, group_memory, parse_cpu_list

log = logging.getLogger("planemesh.cpu")

V2_DEFAULT_WEIGHT = 100
V1_SHARES_PER_WEIGHT = 1024 / V2_DEFAULT_WEIGHT
CONTROLLERS = ("cpu", "cpuset", "memory")
LIMIT_OF = {"cpu": "cpu_weight", "cpuset": "cpuset", "memory": "memory"}  # controller -> reported limit name
# (v2 file, v1 file) of each value written
FILES = {
    "cpus": ("cpuset.cpus", "cpuset.cpus"),
    "cpus_effective": ("cpuset.cpus.effective", "cpuset.effective_cpus"),
    "memory_max": ("memory.max", "memory.limit_in_bytes"),
    "memory_high": ("memory.high", "memory.soft_limit_in_bytes"),
}
NO_LIMIT = ("max", "-1")  # v2, v1


def v1_shares(weight: int) -> int:
    """cgroup v1 cpu.shares equivalent of a v2 cpu.weight (100 -> 1024, the v1 default)."""
    return max(2, min(262144, round(weight * V1_SHARES_PER_WEIGHT)))


def parse_mounts(text: str, controller: str = "cpu") -> tuple[Path | None, Path | None]:
    """(cgroup2 mount, v1 mount carrying `controller`) from /proc/self/mounts."""
    v2 = v1 = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mount, fstype, options = fields[1], fields[2], fields[3].split(",")
        if fstype == "cgroup2" and v2 is None:
            v2 = Path(mount)
        elif fstype == "cgroup" and controller in options and v1 is None:
            v1 = Path(mount)
    return v2, v1


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

    def file(self, group: Path, what: str) -> Path:
        return group / FILES[what][self.version == 1]


@dataclass(frozen=True)
class Wanted:
    """What one plane's group is asked to carry: compared with the last applied before any write."""

    weight: int
    workers: int
    cpus: str | None
    memory_max_mb: int


class CpuGroups:
    """The agent's per-plane worker cgroups (cpu weight, cpuset, memory), each controller where available."""

    def __init__(
        self,
        hierarchy: Hierarchy | None,
        others: Mapping[str, Hierarchy] | None = None,
        unavailable: Mapping[str, str] | None = None,
    ) -> None:
        self.hierarchy = hierarchy  # the cpu controller's
        self.hierarchies = {c: h for c, h in {"cpu": hierarchy, **(others or {})}.items() if h is not None}
        self.unavailable = dict(unavailable or {})  # controller -> why it cannot be used
        self._groups: dict[str, dict[str, Path]] = {}  # plane -> controller -> its group
        self._applied: dict[str, Wanted] = {}  # plane -> what was last written
        self.not_applied: dict[str, dict[str, str]] = {}  # plane -> limit -> why (asked, not in force)
        self._effective: dict[str, str] = {}  # plane -> the kernel's cpuset.cpus.effective

    @classmethod
    def create(cls, instance: str | None = None) -> CpuGroups:
        name = f"planemesh-{instance or os.getpid()}"
        try:
            found, unavailable = _prepare(name)
        except OSError as exc:
            found, unavailable = {}, dict.fromkeys(CONTROLLERS, str(exc))
        for controller, why in unavailable.items():
            log.warning("per-plane %s disabled: %s", LIMIT_OF[controller], why)
        return cls(found.pop("cpu", None), found, unavailable)

    @property
    def enabled(self) -> bool:
        return self.hierarchy is not None

    def set_plane(
        self, plane: str, weight: int, workers: int = 1, cpus: str | None = None, memory_max_mb: int = 0
    ) -> None:
        """Create the plane's groups if needed and set their limits (`workers`: how many processes they hold;
        `memory_max_mb`: per worker, 0 for no limit)."""
        wanted = Wanted(weight, workers, cpus, memory_max_mb)
        if self._applied.get(plane) == wanted:
            return  # called with every snapshot: cgroup files are written only when something changed
        self._applied[plane] = wanted
        problems: dict[str, str] = {}
        groups = self._ensure_groups(plane, problems)
        if "cpu" in groups:
            try:
                self._write_weight(groups["cpu"], weight)
                total_workers = sum(w.workers for w in self._applied.values())
                self._write_weight(self.hierarchies["cpu"].base, min(10000, V2_DEFAULT_WEIGHT * total_workers))
            except OSError as exc:
                problems["cpu_weight"] = f"cannot set CPU weight {weight}: {exc}"
        self._apply_cpuset(plane, groups.get("cpuset"), cpus, problems)
        self._apply_memory(groups.get("memory"), memory_max_mb, workers, problems)
        for limit, why in problems.items():
            if not why.startswith("unavailable:") or limit == "cpuset":  # the rest was logged once at start
                log.warning("plane %s: %s not applied: %s", plane, limit, why)
        self.not_applied[plane] = problems

    def _ensure_groups(self, plane: str, problems: dict[str, str]) -> dict[str, Path]:
        groups = self._groups.setdefault(plane, {})
        for controller, hierarchy in self.hierarchies.items():
            if controller in groups:
                continue
            group = hierarchy.base / f"plane-{plane}"
            try:
                group.mkdir(exist_ok=True)
                if controller == "cpuset" and hierarchy.version == 1:
                    _inherit_cpuset(hierarchy.base, group)
                groups[controller] = group
            except OSError as exc:
                problems[LIMIT_OF[controller]] = f"cannot create {group}: {exc}"
        for controller, why in self.unavailable.items():
            problems[LIMIT_OF[controller]] = f"unavailable: {why}"
        return groups

    def _write_weight(self, group: Path, weight: int) -> None:
        hierarchy = self.hierarchies["cpu"]
        hierarchy.weight_file(group).write_text(hierarchy.weight_value(weight))

    def _apply_cpuset(self, plane: str, group: Path | None, cpus: str | None, problems: dict[str, str]) -> None:
        """Write the plane's cpu list (none: the parent's CPUs) and check that the kernel put it in force."""
        self._effective.pop(plane, None)
        if group is None:
            if cpus is None:
                problems.pop("cpuset", None)  # not asked for: nothing is missing
            return
        problems.pop("cpuset", None)
        hierarchy = self.hierarchies["cpuset"]
        try:
            asked = parse_cpu_list(cpus) if cpus is not None else None
            if asked is not None:
                value = format_cpu_list(asked)
            elif hierarchy.version == 2:
                value = "\n"  # empty: the parent's CPUs
            else:
                value = hierarchy.file(hierarchy.base, "cpus").read_text()
            hierarchy.file(group, "cpus").write_text(value)
            effective = parse_cpu_list(hierarchy.file(group, "cpus_effective").read_text())
            self._effective[plane] = format_cpu_list(effective)
            if asked is not None and effective != asked:  # v2 falls back to the parent's CPUs, silently
                problems["cpuset"] = f"asked {cpus}, the kernel applies {format_cpu_list(effective)}"
        except (OSError, ValueError) as exc:
            problems["cpuset"] = f"cannot pin to CPUs {cpus}: {exc}"

    def _apply_memory(self, group: Path | None, mb: int, workers: int, problems: dict[str, str]) -> None:
        if group is None:
            if mb <= 0:
                problems.pop("memory", None)
            return
        hierarchy = self.hierarchies["memory"]
        limits = group_memory(mb, workers)
        values = [str(v) for v in limits] if limits else [NO_LIMIT[hierarchy.version == 1]] * 2
        try:
            hierarchy.file(group, "memory_max").write_text(values[0])
            hierarchy.file(group, "memory_high").write_text(values[1])
        except OSError as exc:  # v1 refuses a limit below what the group already uses (EBUSY)
            problems["memory"] = f"cannot set memory.max {values[0]}: {exc}"

    def group(self, plane: str, controller: str) -> tuple[Path, int] | None:
        """The plane's group directory for `controller` and its cgroup version (None: not made)."""
        group = self._groups.get(plane, {}).get(controller)
        return None if group is None else (group, self.hierarchies[controller].version)

    def procs_files(self, plane: str) -> list[str]:
        """The plane's groups' `cgroup.procs` files: a worker writes its pid there before it execs (join_argv)."""
        return [str(group / "cgroup.procs") for group in self._groups.get(plane, {}).values()]

    def add(self, plane: str, pid: int) -> None:
        for group in self._groups.get(plane, {}).values():
            try:
                (group / "cgroup.procs").write_text(str(pid))
            except OSError as exc:  # the worker may already be gone: its supervisor restarts it
                log.warning("plane %s: cannot move worker %d into %s: %s", plane, pid, group, exc)

    def weight(self, plane: str) -> int | None:
        group = self._groups.get(plane, {}).get("cpu")
        if group is None or self.hierarchy is None:
            return None
        return int(self.hierarchy.weight_file(group).read_text())

    def report(self) -> dict[str, Any]:
        """The `plane_groups` stats rows (agent/stats_report.py PlaneGroupStats): asked, in force, not applied."""
        rows = []
        for plane, wanted in list(self._applied.items()):  # called on the scrape thread: a copy
            limits = group_memory(wanted.memory_max_mb, wanted.workers)
            missing = self.not_applied.get(plane, {})
            rows.append({
                "plane": plane,
                "cpu_weight": wanted.weight,
                "cpus": wanted.cpus,
                "cpus_effective": self._effective.get(plane),
                "memory_max_bytes": limits[0] if limits and "memory" not in missing else None,
                "memory_high_bytes": limits[1] if limits and "memory" not in missing else None,
                "not_applied": dict(missing),
            })  # fmt: skip
        return {"plane_groups": rows}

    def remove_plane(self, plane: str) -> None:
        groups = self._groups.pop(plane, {})
        self._applied.pop(plane, None)
        self.not_applied.pop(plane, None)
        self._effective.pop(plane, None)
        for group in groups.values():
            _rmdir(group)

    def close(self) -> None:
        for plane in list(self._groups):
            self.remove_plane(plane)
        for base in {h.base for h in self.hierarchies.values()}:
            _rmdir(base)


# The worker joins its groups itself, between fork and exec: everything it allocates from its first instruction
# (interpreter, imports: ~20 MB) is charged to its plane's memory group (cgroup v1 without
# move_charge_at_immigrate, and v2 always, leave the pages of a process moved later in its old group). A shell
# does it, not a preexec_fn: the agent has threads, and the child of a threaded parent must not run Python.
# A failed write is ignored here: CpuGroups.add moves the worker once it runs, and logs what fails.
_JOIN = 'while [ "$1" != -- ]; do echo $$ 2>/dev/null >"$1"; shift; done; shift; exec "$@"'


def join_argv(procs_files: list[str], argv: list[str]) -> list[str]:
    """`argv` run by a shell that first writes its own pid (kept across exec) to each `cgroup.procs` file."""
    if not procs_files:
        return argv
    return ["/bin/sh", "-c", _JOIN, "planemesh-join", *procs_files, "--", *argv]


def _rmdir(group: Path) -> None:
    """Remove a cgroup once its (exiting) processes are gone; a leftover empty group is harmless."""
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


def _prepare(name: str) -> tuple[dict[str, Hierarchy], dict[str, str]]:
    """Each controller's hierarchy (v2 when the unified hierarchy offers it to our cgroup, else v1), and
    why the others cannot be used."""
    mounts = Path("/proc/self/mounts").read_text()
    proc_cgroup = Path("/proc/self/cgroup").read_text()
    v2 = parse_mounts(mounts)[0]
    own = own_cgroup(proc_cgroup, None)
    offered: set[str] = set()
    if v2 is not None:
        with contextlib.suppress(OSError):
            offered = set((v2 / own.lstrip("/") / "cgroup.controllers").read_text().split())
    found: dict[str, Hierarchy] = {}
    unavailable: dict[str, str] = {}
    on_v2 = [c for c in CONTROLLERS if c in offered]
    if v2 is not None and on_v2:
        try:
            hierarchy, enabled = _prepare_v2(v2, own, name, on_v2)
            found.update(dict.fromkeys(enabled, hierarchy))
        except OSError as exc:
            unavailable.update(dict.fromkeys(on_v2, str(exc)))
    for controller in CONTROLLERS:
        if controller in found or controller in unavailable:
            continue
        if controller in on_v2:
            unavailable[controller] = f"cannot enable the {controller} controller below our cgroup v2 {own}"
            continue
        v1 = parse_mounts(mounts, controller)[1]
        if v1 is None:
            unavailable[controller] = f"no cgroup {controller} controller (neither cgroup v2 nor v1 offers it)"
            continue
        try:
            found[controller] = _prepare_v1(v1 / own_cgroup(proc_cgroup, controller).lstrip("/"), name, controller)
        except OSError as exc:
            unavailable[controller] = str(exc)
    return found, unavailable


def _prepare_v1(parent: Path, name: str, controller: str) -> Hierarchy:
    remove_stale_groups(parent)
    base = parent / name
    base.mkdir(exist_ok=True)
    if controller == "cpuset":
        _inherit_cpuset(parent, base)
    return Hierarchy(base, 1)


def _inherit_cpuset(parent: Path, group: Path) -> None:
    """A new v1 cpuset group has no CPUs and no memory nodes (no task may join it): give it the parent's."""
    for name in ("cpuset.mems", "cpuset.cpus"):
        (group / name).write_text((parent / name).read_text())


def _enable(group: Path, controllers: list[str]) -> list[str]:
    """Hand `controllers` to the children of a v2 group, one by one; those that could be, or the first error."""
    enabled, error = [], None
    for controller in controllers:
        try:
            (group / "cgroup.subtree_control").write_text(f"+{controller}")
            enabled.append(controller)
        except OSError as exc:
            error = error or exc
    if not enabled and error is not None:
        raise error
    return enabled


def _prepare_v2(mount: Path, own: str, name: str, controllers: list[str]) -> tuple[Hierarchy, list[str]]:
    own_dir = mount / own.lstrip("/")
    try:
        enabled = _enable(own_dir, controllers)
    except OSError:
        if own == "/":
            raise
        # Our own (delegated) cgroup holds processes: move them into a leaf, then delegate below it.
        leaf = own_dir / "agent"
        leaf.mkdir(exist_ok=True)
        for pid in (own_dir / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (leaf / "cgroup.procs").write_text(pid)
        enabled = _enable(own_dir, controllers)
    base = own_dir / name
    remove_stale_groups(own_dir)
    base.mkdir(exist_ok=True)
    return Hierarchy(base, 2), _enable(base, enabled)
