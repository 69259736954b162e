"""Priority between planes when the node as a whole runs short of CPU or memory (sans-IO).

The agent samples the node's pressure (agent/node_overload.py reads the files) and asks this module how much
of each plane's load to shed:

- `parse_psi`, `parse_stall`, `parse_meminfo`, `parse_stat`: the kernel's text -> numbers. Pressure stall
  information (/proc/pressure/cpu and memory: the share of time in which some task waited for the resource,
  from the `some` line's `total` between two samples, its avg10 for the first) when the kernel has it;
  otherwise the run queue (/proc/stat procs_running per online CPU) and the CPU time the hypervisor stole
  since the last sample; MemAvailable / MemTotal for memory either way.
- `classify`: a reading -> OVER (any figure above its high mark), UNDER (every figure below its low mark) or
  HOLD (between the marks: hysteresis, so the shed level does not flap).
- `ShedController`: one shed "step" more per OVER sample, one less per UNDER sample. The steps fill the
  planes from the lowest priority up: the lowest tier sheds 25%, 50%, 75%, 100% of its requests before the
  next tier sheds any, and the planes of the highest priority never shed for the node's sake (they are what
  the shedding protects; their own workers' memory manager, agent/proxy/overload.py, still applies). Planes
  of equal priority shed alike. Priority is the SLA's `priority` (HTB prio: 0 highest .. 7 lowest).

Envoy's overload manager has the same shape on one proxy (resource monitors -> actions at thresholds); it has
no notion of planes, nor of the node's PSI (its monitors are its own heap and connections).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class Signal(enum.Enum):
    UNDER = -1
    HOLD = 0
    OVER = 1


@dataclass(frozen=True)
class Pressure:
    """One reading of the node; None where the figure is not available."""

    cpu_some: float | None = None  # PSI cpu `some`: percent of the time since the last sample
    memory_some: float | None = None  # PSI memory `some`, likewise
    memory_available: float | None = None  # MemAvailable / MemTotal, 0..1
    runnable_per_cpu: float | None = None  # procs_running / online CPUs (used when there is no cpu PSI)
    steal: float | None = None  # share of CPU time stolen since the last sample, 0..1 (no cpu PSI)


@dataclass(frozen=True)
class Thresholds:
    """High marks (OVER above) and low marks (UNDER below each). Defaults: a node whose tasks wait for a CPU
    half the time is overloaded (PSI cpu some 50%), calm again under 25%; memory stalls are rarer and
    costlier (10% / 2%); MemAvailable under 5% of RAM is overload (the OOM killer is near), over 10% calm."""

    cpu_some_high: float = 50.0
    cpu_some_low: float = 25.0
    memory_some_high: float = 10.0
    memory_some_low: float = 2.0
    memory_available_min: float = 0.05
    memory_available_ok: float = 0.10
    runnable_per_cpu_high: float = 2.0
    runnable_per_cpu_low: float = 1.0
    steal_high: float = 0.30
    steal_low: float = 0.10

    def check(self) -> None:
        """ValueError naming the first pair whose low mark is not below its high mark."""
        pairs = {
            "cpu_some": (self.cpu_some_low, self.cpu_some_high),
            "memory_some": (self.memory_some_low, self.memory_some_high),
            "memory_available": (self.memory_available_min, self.memory_available_ok),
            "runnable_per_cpu": (self.runnable_per_cpu_low, self.runnable_per_cpu_high),
            "steal": (self.steal_low, self.steal_high),
        }
        for name, (low, high) in pairs.items():
            if not 0 <= low < high:
                raise ValueError(f"{name}: the low mark ({low}) must be below the high mark ({high}), both >= 0")


def classify(p: Pressure, t: Thresholds) -> Signal:
    """OVER if any figure is past its high mark, UNDER if every known figure is inside its low mark, else HOLD.
    The run queue and steal count only without cpu PSI (PSI already sees both: tasks waiting are tasks waiting)."""
    over: list[bool] = []
    calm: list[bool] = []

    def high_is_bad(value: float | None, low: float, high: float) -> None:
        if value is not None:
            over.append(value > high)
            calm.append(value < low)

    high_is_bad(p.cpu_some, t.cpu_some_low, t.cpu_some_high)
    high_is_bad(p.memory_some, t.memory_some_low, t.memory_some_high)
    if p.cpu_some is None:
        high_is_bad(p.runnable_per_cpu, t.runnable_per_cpu_low, t.runnable_per_cpu_high)
        high_is_bad(p.steal, t.steal_low, t.steal_high)
    if p.memory_available is not None:  # low is bad: the marks are the other way round
        over.append(p.memory_available < t.memory_available_min)
        calm.append(p.memory_available > t.memory_available_ok)
    if any(over):
        return Signal.OVER
    if calm and all(calm):
        return Signal.UNDER
    return Signal.HOLD


STEPS_PER_TIER = 4  # a tier sheds 25%, 50%, 75%, then all of its requests


class ShedController:
    """Per-plane shed fractions from a sequence of signals (see the module docstring)."""

    def __init__(self, steps_per_tier: int = STEPS_PER_TIER) -> None:
        self.steps_per_tier = max(1, steps_per_tier)
        self.steps = 0

    def update(self, signal: Signal, priorities: Mapping[str, int]) -> dict[str, float]:
        tiers = sheddable_tiers(priorities)
        self.steps = max(0, min(self.steps + signal.value, self.steps_per_tier * len(tiers)))
        return self.fractions(priorities)

    def fractions(self, priorities: Mapping[str, int]) -> dict[str, float]:
        tiers = sheddable_tiers(priorities)
        self.steps = min(self.steps, self.steps_per_tier * len(tiers))  # planes may have gone
        per = self.steps_per_tier
        by_priority = {prio: max(0, min(self.steps - i * per, per)) / per for i, prio in enumerate(tiers)}
        return {plane: by_priority.get(prio, 0.0) for plane, prio in priorities.items()}


def sheddable_tiers(priorities: Mapping[str, int]) -> list[int]:
    """The priority values that may shed, lowest priority (highest number) first; the top one never does."""
    values = sorted(set(priorities.values()), reverse=True)
    return values[:-1]


# ---- the kernel's text ---------------------------------------------------------------------------------------


def parse_psi(text: str, line: str = "some", field: str = "avg10") -> float:
    """A figure of a /proc/pressure file ("some avg10=1.23 avg60=... total=..."); ValueError if absent."""
    for row in text.splitlines():
        words = row.split()
        if words and words[0] == line:
            for word in words[1:]:
                key, _, value = word.partition("=")
                if key == field:
                    return float(value)
    raise ValueError(f"no {line} {field} in pressure text {text[:60]!r}")


@dataclass(frozen=True)
class Stall:
    """A PSI line's figures: the 10 s average (percent) and the cumulative stall time (microseconds)."""

    avg10: float
    total_us: int


def parse_stall(text: str, line: str = "some") -> Stall:
    return Stall(parse_psi(text, line, "avg10"), int(parse_psi(text, line, "total")))


def stall_share(before: Stall, after: Stall, elapsed_s: float) -> float:
    """Percent of the time between two readings in which some task stalled (PSI's `total` moves in
    microseconds): what the node is doing now, where avg10 still remembers the last ten seconds."""
    if elapsed_s <= 0:
        return after.avg10
    return min(100.0, max(0, after.total_us - before.total_us) / (elapsed_s * 1e6) * 100)


def parse_meminfo(text: str) -> float:
    """MemAvailable / MemTotal from /proc/meminfo; ValueError if either is missing."""
    values: dict[str, int] = {}
    for row in text.splitlines():
        key, _, rest = row.partition(":")
        if key in ("MemTotal", "MemAvailable") and rest.split():
            values[key] = int(rest.split()[0])
    if "MemTotal" not in values or "MemAvailable" not in values or values["MemTotal"] <= 0:
        raise ValueError("/proc/meminfo has no MemTotal and MemAvailable")
    return values["MemAvailable"] / values["MemTotal"]


@dataclass(frozen=True)
class CpuTimes:
    total: int  # jiffies, all states
    steal: int
    running: int  # procs_running: tasks runnable now (the run queue)


def parse_stat(text: str) -> CpuTimes:
    """The aggregate `cpu` line and procs_running of /proc/stat; ValueError if missing."""
    total = steal = running = None
    for row in text.splitlines():
        words = row.split()
        if words and words[0] == "cpu":
            times = [int(x) for x in words[1:]]
            total, steal = sum(times[:8]), (times[7] if len(times) > 7 else 0)  # guest time is inside user
        elif words and words[0] == "procs_running":
            running = int(words[1])
    if total is None or running is None:
        raise ValueError("/proc/stat has no cpu line or procs_running")
    return CpuTimes(total, steal or 0, running)


def steal_share(before: CpuTimes, after: CpuTimes) -> float | None:
    """Share of the CPU time between two samples that the hypervisor stole (None: no time passed)."""
    elapsed = after.total - before.total
    return None if elapsed <= 0 else max(0, after.steal - before.steal) / elapsed
