"""The agent's node-wide overload loop: sample the node's pressure, decide each plane's shed fraction
(agent/node_pressure.py), tell the planes' workers (PlaneWorkers.set_shed -> the worker's OverloadManager,
which answers that share of its requests 503 with `x-planemesh-overloaded: node` and the access-log flag OM).

Configured by a `node_overload:` section of the static config or of the xDS bootstrap (absent: off):

    node_overload:
      enabled: true
      interval_s: 0.5           # one sample (and at most one shed step) per interval
      proc_root: /proc          # where pressure/, meminfo, stat are read (a container: the host's /proc)
      thresholds: {cpu_some_high: 50, cpu_some_low: 25, ...}   # agent/node_pressure.py Thresholds

Off unless asked for: the marks are a property of the node (a shared VM lives at a CPU pressure a dedicated
node would call overload), so the operator sets them for the node. SIGHUP re-reads the section (agent/daemon.py):
new marks or interval apply from the next sample and keep the current shed level; turned off, every plane
serves everything again. Metrics: planemesh_node_shed_fraction and planemesh_node_shed_requests per plane.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planemesh.agent.node_pressure import (
    CpuTimes,
    Pressure,
    ShedController,
    Signal,
    Stall,
    Thresholds,
    classify,
    parse_meminfo,
    parse_stall,
    parse_stat,
    stall_share,
    steal_share,
)
from planemesh.model.config import ConfigError
from planemesh.model.plane_limits import parse_cpu_list
from planemesh.model.static_config import read_yaml_file

log = logging.getLogger("planemesh.node_overload")

SECTION = "node_overload"


@dataclass(frozen=True)
class NodeOverloadConfig:
    enabled: bool = False
    interval_s: float = 0.5
    proc_root: str = "/proc"
    thresholds: Thresholds = field(default_factory=Thresholds)


def node_overload_from_dict(raw: Any, path: str = SECTION) -> NodeOverloadConfig:
    """Parse the section (None: off). ConfigError naming the field."""
    if raw is None:
        return NodeOverloadConfig()
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping, got {type(raw).__name__}")
    allowed = {"enabled", "interval_s", "proc_root", "thresholds"}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise ConfigError(f"{path}.{extra[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{path}.enabled", f"expected true or false, got {enabled!r}")
    interval = raw.get("interval_s", 0.5)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not 0.05 <= interval <= 60:
        raise ConfigError(f"{path}.interval_s", f"expected seconds between 0.05 and 60, got {interval!r}")
    proc_root = raw.get("proc_root", "/proc")
    if not isinstance(proc_root, str) or not proc_root.startswith("/"):
        raise ConfigError(f"{path}.proc_root", f"expected an absolute path, got {proc_root!r}")
    return NodeOverloadConfig(enabled, float(interval), proc_root, _thresholds(raw.get("thresholds"), path))


def _thresholds(raw: Any, path: str) -> Thresholds:
    where = f"{path}.thresholds"
    if raw is None:
        return Thresholds()
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(Thresholds)}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{where}.{key}", f"unknown threshold (known: {', '.join(sorted(known))})")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{where}.{key}", f"expected a number >= 0, got {value!r}")
    thresholds = Thresholds(**{k: float(v) for k, v in raw.items()})
    try:
        thresholds.check()
    except ValueError as exc:
        raise ConfigError(where, str(exc)) from exc
    return thresholds


def load_node_overload(config_file: str | Path | None) -> NodeOverloadConfig:
    """The `node_overload:` section of the static config or bootstrap file (none: off)."""
    if config_file is None:
        return NodeOverloadConfig()
    raw = read_yaml_file(config_file)
    return node_overload_from_dict(raw.get(SECTION) if isinstance(raw, dict) else None)


class NodeSampler:
    """Reads the node's pressure under `proc_root`: PSI when the kernel offers it, else run queue and steal."""

    def __init__(self, proc_root: str = "/proc", clock: Callable[[], float] = time.monotonic) -> None:
        self.root = Path(proc_root)
        self.clock = clock
        self._last_stat: CpuTimes | None = None
        self._last_stall: dict[str, tuple[Stall, float]] = {}
        self._cpus = _online_cpus()

    def read(self) -> Pressure:
        cpu_some = self._psi("cpu")
        runnable = steal = None
        if cpu_some is None:
            stat = _read(self.root / "stat", parse_stat)
            if stat is not None:
                runnable = stat.running / self._cpus
                steal = steal_share(self._last_stat, stat) if self._last_stat is not None else None
                self._last_stat = stat
        return Pressure(
            cpu_some=cpu_some,
            memory_some=self._psi("memory"),
            memory_available=_read(self.root / "meminfo", parse_meminfo),
            runnable_per_cpu=runnable,
            steal=steal,
        )

    def _psi(self, resource: str) -> float | None:
        """Percent stalled since the last sample (avg10 on the first: nothing to compare with yet)."""
        stall = _read(self.root / "pressure" / resource, parse_stall)
        now = self.clock()
        last = self._last_stall.get(resource)
        if stall is None:
            self._last_stall.pop(resource, None)
            return None
        self._last_stall[resource] = (stall, now)
        return stall.avg10 if last is None else stall_share(last[0], stall, now - last[1])


def _read(path: Path, parse: Callable[[str], Any]) -> Any:
    """A parsed file, or None when it is absent or unreadable (no PSI: EOPNOTSUPP) or malformed."""
    try:
        return parse(path.read_text())
    except (OSError, ValueError, IndexError):
        return None


def _online_cpus() -> int:
    try:
        return max(1, len(parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text())))
    except (OSError, ValueError):
        return 1


Push = Callable[[str, float], Awaitable[None]]


class NodeShedding:
    """The loop: one sample per interval -> signal -> per-plane fractions -> pushed where they changed."""

    def __init__(self, config: NodeOverloadConfig, sampler: NodeSampler | None = None) -> None:
        self.config = config
        self.sampler = sampler or NodeSampler(config.proc_root)
        self.controller = ShedController()
        self.fractions: dict[str, float] = {}
        self.last: Pressure | None = None
        self.signal = Signal.HOLD

    def reconfigure(self, config: NodeOverloadConfig) -> None:
        """New marks and interval from the next sample on; the shed level reached so far stays (no jump)."""
        if config.proc_root != self.config.proc_root:
            self.sampler = NodeSampler(config.proc_root)
        self.config = config

    def report(self) -> dict[str, list[dict[str, Any]]]:
        """Each plane's shed level as NodeShedStats rows (agent/stats_report.py)."""
        return {"node_shed": [{"plane": p, "fraction": f} for p, f in sorted(self.fractions.items())]}

    def step(self, priorities: Mapping[str, int]) -> dict[str, float]:
        """Sample once; every plane's shed fraction (a change is logged)."""
        self.last = self.sampler.read()
        self.signal = classify(self.last, self.config.thresholds)
        wanted = self.controller.update(self.signal, priorities)
        changed = {plane: f for plane, f in wanted.items() if self.fractions.get(plane, 0.0) != f}
        if changed:
            log.warning(
                "node %s (%s): shedding %s",
                "overloaded" if self.signal is Signal.OVER else "calmer",
                _describe(self.last),
                ", ".join(f"{p} {f:.0%}" for p, f in sorted(wanted.items())),
            )
        self.fractions = wanted
        return wanted

    async def run(self, priorities: Callable[[], Mapping[str, int]], push: Push) -> None:
        """Every interval: sample, and hand each plane its fraction (the push sends only what changed for the
        plane's workers, so a plane whose workers were replaced gets it again)."""
        while True:
            for plane, fraction in self.step(priorities()).items():
                await push(plane, fraction)
            await asyncio.sleep(self.config.interval_s)


def _describe(p: Pressure) -> str:
    parts = []
    for name, value in dataclasses.asdict(p).items():
        if value is not None:
            parts.append(f"{name}={value:.2f}")
    return " ".join(parts) or "no figures"
