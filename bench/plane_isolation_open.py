"""The isolation bench's open-loop probe (labs/open_loop_client.py) and its table: oam's latency at a fixed
offered rate below its capacity, idle and flooded, next to the closed-loop ratios.

Why both: the closed-loop probe (wrk -c2) sends as fast as oam answers, so oam's worker is saturated and its
p99 is mostly queueing behind its own CPU: a few percent less CPU for oam (what load on the other vCPU costs on
this VM) moves it a lot, and while oam stalls wrk sends nothing, so a stall is one slow sample (coordinated
omission). A latency SLA is judged at a fixed offered load below capacity: the open-loop probe offers
`--probe-share` (default 25%) of the closed-loop req/s oam gave idle right before, in the same pair (or a fixed
`--probe-rate`), and times each request from when it was due, so a stall counts in every request that fell due
during it. The SLA figures: the share of requests answered more than 10 ms after they fell due (late; <= 1% is
"p99 within 10 ms"), and the open-loop p99 flooded/idle. 25%, not 50%: the probe is Python and costs oam's CPU
3-5x what wrk does per request (170-300 ms/s of it), so half the closed-loop rate kept that CPU ~75% busy.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from typing import Protocol

from planemesh.labs.open_loop import LATE_MS, Summary

PROBE_SHARE = 0.25  # of oam's idle closed-loop req/s in the same pair (module doc: why not 0.5)
LATE_BUDGET = 0.01  # late share <= 1%: the p99 from due time within LATE_MS
PROBE_CONNECTIONS = 8  # one request in flight each: 8 x the service time of slack before a request waits
PROBE_DRAIN_S = 1.0  # after the last request fell due, answers later than this count as none
MIN_RATE = 50.0  # when the closed-loop probe got (almost) nothing idle, still offer something


def open_argv(host: str, port: int, path: str, rate: float, seconds: float) -> list[str]:
    return [
        sys.executable, "-m", "planemesh.labs.open_loop_client", "--host", host, "--port", str(port),
        "--path", path, "--rate", f"{rate:.0f}", "--seconds", f"{seconds:g}",
        "--connections", str(PROBE_CONNECTIONS), "--timeout", f"{PROBE_DRAIN_S:g}",
    ]  # fmt: skip


def offered_rate(fixed: float | None, share: float, idle_rps: float) -> float:
    """The pair's open-loop rate: `fixed`, else `share` of what oam answered idle, closed loop, just before."""
    return fixed if fixed else max(MIN_RATE, share * idle_rps)


def parse_open(out: str) -> Summary | str:
    """The probe's Summary, or what went wrong (text)."""
    try:
        raw = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"open-loop probe printed no summary: {out[-200:]!r}"
    if "scheduled" not in raw:  # the probe's own failure (a Summary has an "error" field too: its last break)
        return f"open-loop probe failed: {raw.get('error', raw)}"
    try:
        return Summary.from_json_dict(raw)
    except TypeError as exc:
        return f"open-loop probe summary unreadable: {exc}"


# ---- the report -------------------------------------------------------------------------------------------------


class Paired(Protocol):
    """A measured pair (bench/plane_isolation.py Row), as far as this table reads it."""

    @property
    def open_idle(self) -> Summary | None: ...
    @property
    def open_flooded(self) -> Summary | None: ...
    @property
    def p99_ratio(self) -> float: ...
    @property
    def rps_ratio(self) -> float: ...


def ratio(value: float) -> str:
    return f"{value:.2f}x" if value != float("inf") else "-"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def spread(ratios: Sequence[float]) -> str:
    """The median ratio, and with several rounds their range."""
    shown = ratio(median(ratios))
    finite = [r for r in ratios if r != float("inf")]
    if len(ratios) > 1 and finite:
        shown += f" ({min(finite):.2f}-{max(finite):.2f}{', some no answer' if len(finite) < len(ratios) else ''})"
    return shown


def _over(flooded: float, idle: float) -> float:
    return flooded / idle if idle and flooded != float("inf") else float("inf")


def _ms(value: float) -> str:
    return "no answer" if value == float("inf") else f"{value:.2f}"


def open_loop_table(groups: list[tuple[tuple[str, str], list[Paired]]]) -> list[str]:
    out = [
        f"open loop (**the SLA figures**: a fixed offered rate, latency from each request's due time; late: answered "
        f"more than {LATE_MS:g} ms after it fell due, or never), next to the closed-loop ratios:",
        "",
        "| flood | proxy | offered req/s | p50 idle -> flooded ms | p99 idle -> flooded ms | **p99 flooded/idle** "
        "| p99.9 idle -> flooded ms | p99.9 flooded/idle | late idle, flooded | no answer "
        "| probe's own lag p99 ms, its CPU ms/s | closed loop: p99 flooded/idle | closed loop: req/s flooded/idle |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (kind, variant), rows in groups:
        pairs = [(r.open_idle, r.open_flooded) for r in rows if r.open_idle and r.open_flooded]
        closed = f"| {spread([r.p99_ratio for r in rows])} | {spread([r.rps_ratio for r in rows])} |"
        if not pairs:
            out.append(f"| {kind} | {variant} | - | - | - | - | - | - | - | - | - {closed}")
            continue
        idle, flooded = [p[0] for p in pairs], [p[1] for p in pairs]

        def both(attr: str, i: list[Summary] = idle, f: list[Summary] = flooded) -> str:
            return f"{_ms(median([getattr(s, attr) for s in i]))} -> {_ms(median([getattr(s, attr) for s in f]))}"

        late = (f"{100 * median([s.late_share for s in idle]):.2f}%, "
                f"{100 * median([s.late_share for s in flooded]):.2f}%")  # fmt: skip
        out.append(
            f"| {kind} | {variant} | {median([s.rate for s in idle]):.0f} | {both('p50_ms')} | {both('p99_ms')} "
            f"| **{spread([_over(f.p99_ms, i.p99_ms) for i, f in pairs])}** | {both('p999_ms')} "
            f"| {spread([_over(f.p999_ms, i.p999_ms) for i, f in pairs])} | {late} "
            f"| {sum(s.no_answer for s in idle)}, {sum(s.no_answer for s in flooded)} "
            f"| {median([max(i.own_lag_p99_ms, f.own_lag_p99_ms) for i, f in pairs]):.2f}, "
            f"{median([1000 * s.cpu_s / s.seconds for s in idle + flooded]):.0f} {closed}"
        )
    return out


def open_loop_verdict(groups: list[tuple[tuple[str, str], list[Paired]]], target: float, floor: float | None) -> str:
    """With cpusets: how many floods keep the open-loop late share within LATE_BUDGET and the p99 ratio within
    the target (and the VM's floor)."""
    measured = [[(r.open_idle, r.open_flooded) for r in rows if r.open_idle and r.open_flooded] for _, rows in groups]
    pairs = [p for p in measured if p]
    medians = [median([_over(f.p99_ms, i.p99_ms) for i, f in p]) for p in pairs]
    late = [median([f.late_share for _, f in p]) for p in pairs]
    if not medians:
        return ""
    shown = f"with cpusets, open loop (the SLA figures): late (> {LATE_MS:g} ms) <= {100 * LATE_BUDGET:g}% flooded "
    shown += f"for {sum(x <= LATE_BUDGET for x in late)}/{len(late)} floods; p99 target (<= {target}x) met for "
    shown += f"{sum(m <= target for m in medians)}/{len(medians)} floods"
    if floor is not None:
        shown += f"; within max(target, the open-loop VM floor {floor:.2f}x) for "
        shown += f"{sum(m <= max(target, floor) for m in medians)}/{len(medians)}"
    return shown


def open_floor(rows: Sequence[Paired]) -> float | None:
    ratios = [_over(r.open_flooded.p99_ms, r.open_idle.p99_ms) for r in rows if r.open_idle and r.open_flooded]
    return median(ratios) if ratios else None
