"""`planemesh top`: a live per-plane view of the agent, refreshed each second, from its admin endpoint.

The view is a pure function of two samples (`rows(prev, cur)` -> `PlaneRow`s, `render(...)` -> lines); the loop
around it only fetches `/status` and `/stats?format=json` and draws (curses on a terminal; plain text frames with
`--once` / `--iterations N` or when stdout is not a terminal). Counters that went backwards (a worker or the
agent restarted) count from zero, as Prometheus' rate() does.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from planemesh.agent.admin_client import EXIT_OK, EXIT_UNREACHABLE, AdminClient, first_admin
from planemesh.model.defaults import option

# Response flags that are not errors (Envoy: DI delay injected); every other flag counts as an error.
NOT_ERRORS = frozenset({"DI"})
TO_PROXY = ("proxy", "sniff")  # TC verdicts (ebpf/abi.py Action) that send a packet to a proxy listener


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the agent: monotonic time, /status and /stats?format=json bodies."""

    t: float
    status: Mapping[str, Any]
    stats: Mapping[str, Any]


@dataclass(slots=True)
class PlaneRow:
    plane: str
    rps: float = 0.0
    err_rps: float = 0.0  # 5xx responses per second
    p50_ms: float | None = None  # over the interval; None: no request in it
    p99_ms: float | None = None
    conns_down: int = 0
    conns_up: int = 0
    proxied_bps: float = 0.0  # HTTP bodies both ways + passthrough bytes, per second
    bypass_pps: float = 0.0  # packets the TC program let through in the kernel
    proxy_pps: float = 0.0  # packets it sent to the proxy
    bypass_bps: float = 0.0
    proxy_bps: float = 0.0
    limits_ps: float = 0.0  # SLA limits hit per second (sum of `limits`)
    limits: dict[str, float] = field(default_factory=dict)  # rate limited, breakers, shed, per source, ...
    flags: dict[str, float] = field(default_factory=dict)  # error response flag -> per second
    memory_mb: float = 0.0  # workers' RSS growth since they started (the overload manager's measure)
    overload: str = "-"  # "-", "soft" or "hard" (workers at that level)


def _delta(cur: float, prev: float | None) -> float:
    if prev is None or cur < prev:  # new, or reset
        return cur
    return cur - prev


def _by_plane(stats: Mapping[str, Any], key: str) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for row in stats.get(key) or ():
        out.setdefault(str(row.get("plane", "?")), []).append(row)
    return out


def _sum(rows: Iterable[Mapping[str, Any]], name: str) -> float:
    return float(sum(r.get(name) or 0 for r in rows))


def _sum_dicts(rows: Iterable[Mapping[str, Any]], name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        for k, v in (r.get(name) or {}).items():
            out[k] = out.get(k, 0.0) + float(v)
    return out


def _histogram(rows: Iterable[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    bounds: list[float] = []
    counts: list[float] = []
    for r in rows:
        lat = r.get("latency") or {}
        if not bounds:
            bounds, counts = list(lat.get("bounds", ())), [0.0] * len(lat.get("counts", ()))
        if list(lat.get("bounds", ())) == bounds and len(lat.get("counts", ())) == len(counts):
            counts = [a + b for a, b in zip(counts, lat["counts"], strict=True)]
    return bounds, counts


def quantile_ms(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float | None:
    """Prometheus' histogram_quantile on per-bucket (not cumulative) counts; the overflow bucket reports the
    last bound. None when there is no observation."""
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    rank, seen = q * total, 0.0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return bounds[-1] * 1000
            lower = bounds[i - 1] if i else 0.0
            return (lower + (bounds[i] - lower) * (rank - seen) / n) * 1000
        seen += n
    return bounds[-1] * 1000


def _interval_hist(prev: Sequence[Mapping[str, Any]], cur: Sequence[Mapping[str, Any]]) -> list[float] | None:
    b_prev, c_prev = _histogram(prev)
    b_cur, c_cur = _histogram(cur)
    if not b_cur:
        return None
    if b_prev != b_cur or len(c_prev) != len(c_cur) or sum(c_cur) < sum(c_prev):
        return c_cur  # new or restarted: everything counted so far
    return [a - b for a, b in zip(c_cur, c_prev, strict=True)]


def _plane_names(cur: Sample) -> list[str]:
    names = list(cur.status.get("planes") or [])
    for key in ("routes", "listeners", "datapath", "overload"):
        names += [n for n in _by_plane(cur.stats, key) if n not in names]
    return names


def rows(prev: Sample, cur: Sample) -> list[PlaneRow]:
    """Per-plane rates over the interval between two samples, and the current gauges."""
    dt = max(cur.t - prev.t, 1e-6)
    out = []
    p_stats, c_stats = prev.stats, cur.stats
    grouped = {key: (_by_plane(p_stats, key), _by_plane(c_stats, key))
               for key in ("routes", "listeners", "clusters", "datapath", "sniff", "overload")}  # fmt: skip

    def rate(key: str, plane: str, name: str) -> float:
        before, after = grouped[key]
        return _delta(_sum(after.get(plane, ()), name), _sum(before.get(plane, ()), name) if plane in before else None)

    def rates(key: str, plane: str, name: str) -> dict[str, float]:
        before, after = grouped[key]
        b = _sum_dicts(before.get(plane, ()), name) if plane in before else {}
        return {k: _delta(v, b.get(k)) for k, v in _sum_dicts(after.get(plane, ()), name).items()}

    for plane in _plane_names(cur):
        row = PlaneRow(plane)
        row.rps = rate("routes", plane, "requests") / dt
        row.err_rps = rates("routes", plane, "responses").get("5xx", 0.0) / dt
        flags = rates("routes", plane, "response_flags")
        row.flags = {k: v / dt for k, v in flags.items() if k not in NOT_ERRORS and v}
        hist = _interval_hist(grouped["routes"][0].get(plane, ()), grouped["routes"][1].get(plane, ()))
        if hist is not None:
            bounds, _ = _histogram(grouped["routes"][1].get(plane, ()))
            row.p50_ms, row.p99_ms = quantile_ms(0.5, bounds, hist), quantile_ms(0.99, bounds, hist)
        row.conns_down = int(_sum(grouped["listeners"][1].get(plane, ()), "active_connections"))
        row.conns_up = int(_sum(grouped["clusters"][1].get(plane, ()), "active_connections"))
        proxied = sum(rate("routes", plane, n) for n in ("request_bytes", "response_bytes"))
        proxied += sum(rate("sniff", plane, n) for n in ("passthrough_bytes_up", "passthrough_bytes_down"))
        row.proxied_bps = proxied / dt
        packets, nbytes = rates("datapath", plane, "packets"), rates("datapath", plane, "bytes")
        row.bypass_pps = packets.get("bypass", 0.0) / dt
        row.bypass_bps = nbytes.get("bypass", 0.0) / dt
        row.proxy_pps = sum(packets.get(k, 0.0) for k in TO_PROXY) / dt
        row.proxy_bps = sum(nbytes.get(k, 0.0) for k in TO_PROXY) / dt
        limits = {
            "rate_limited": rate("listeners", plane, "rate_limited"),
            **{f"breaker_{k}": v for k, v in rates("clusters", plane, "circuit_breaker_overflows").items()},
            "shed_requests": rate("overload", plane, "shed_requests"),
            "shed_connections": rate("overload", plane, "shed_connections"),
            "overload_resets": rate("overload", plane, "resets"),
            "source_refused": rate("overload", plane, "source_refused"),
        }
        row.limits = {k: v / dt for k, v in limits.items() if v}
        row.limits_ps = sum(row.limits.values())
        over = grouped["overload"][1].get(plane, ())
        row.memory_mb = _sum(over, "memory_bytes") / (1 << 20)
        row.overload = "hard" if _sum(over, "workers_hard") else "soft" if _sum(over, "workers_soft") else "-"
        out.append(row)
    return out


def _num(value: float | None, width: int, digits: int = 1) -> str:
    if value is None:
        return f"{'-':>{width}}"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale * 10:
            return f"{value / scale:>{width - 1}.{digits}f}{unit}"
    return f"{value:>{width}.{digits}f}"


HEADER = (
    f"{'PLANE':<10} {'REQ/s':>7} {'5XX/s':>6} {'P50ms':>6} {'P99ms':>7} {'CONN':>9} {'PROXY B/s':>9} "
    f"{'BYPASS pkt/s':>12} {'PROXY pkt/s':>11} {'BYPASS B/s':>10} {'LIMITS/s':>8} {'MEM+MB':>7} {'OVL':>4}"
)


def _title(status: Mapping[str, Any], interval: float) -> str:
    ready = "ready" if status.get("ready") else "NOT READY (" + ", ".join(status.get("blockers") or ()) + ")"
    xds = status.get("xds_connected")
    xds_text = "xds -" if xds is None else "xds connected" if xds else "xds DISCONNECTED"
    return (f"planemesh top - pid {status.get('pid', '?')} up {float(status.get('uptime_s') or 0):.0f}s  {ready}  "
            f"{xds_text}  config {status.get('snapshot_version') or '-'}  every {interval:.1f}s")  # fmt: skip


def render(prev: Sample, cur: Sample) -> list[str]:
    """The screen for two samples: a title, xDS versions, one line per plane and its flags and limits hit."""
    lines = [_title(cur.status, cur.t - prev.t)]
    versions = cur.status.get("xds_versions") or {}
    if versions:
        lines.append("xds  " + "  ".join(f"{t.rsplit('.', 1)[-1]}={v or '-'}" for t, v in sorted(versions.items())))
    nacks = {r["type_url"]: r.get("nacks", 0) for r in cur.stats.get("xds") or () if r.get("nacks")}
    if nacks:
        lines.append("xds NACKs  " + "  ".join(f"{t.rsplit('.', 1)[-1]}={n}" for t, n in sorted(nacks.items())))
    lines += ["", HEADER]
    for r in rows(prev, cur):
        lines.append(
            f"{r.plane[:10]:<10} {_num(r.rps, 7)} {_num(r.err_rps, 6)} {_num(r.p50_ms, 6, 2)} {_num(r.p99_ms, 7, 2)} "
            f"{f'{r.conns_down}/{r.conns_up}':>9} {_num(r.proxied_bps, 9, 0)} {_num(r.bypass_pps, 12)} "
            f"{_num(r.proxy_pps, 11)} {_num(r.bypass_bps, 10, 0)} {_num(r.limits_ps, 8)} {_num(r.memory_mb, 7)} "
            f"{r.overload:>4}"
        )
        extra = [f"{k}={v:.1f}/s" for k, v in sorted(r.flags.items())]
        extra += [f"{k}={v:.1f}/s" for k, v in sorted(r.limits.items())]
        if extra:
            lines.append(f"{'':<10} " + " ".join(extra))
    return lines


# ---- I/O: fetching samples, drawing them ---------------------------------------------------------------------


def fetch(client: AdminClient) -> Sample:
    _, status = client.get_json("/status")
    code, stats = client.get_json("/stats?format=json")
    return Sample(time.monotonic(), status, stats if code == 200 else {})


def plain(client: AdminClient, out: TextIO, interval: float, iterations: int) -> int:
    prev = fetch(client)
    for i in range(iterations):
        time.sleep(interval)
        cur = fetch(client)
        out.write(("\n" if i else "") + "\n".join(render(prev, cur)) + "\n")
        out.flush()
        prev = cur
    return EXIT_OK


def live(client: AdminClient, interval: float) -> int:  # pragma: no cover - needs a terminal
    import curses

    def loop(screen: Any) -> None:
        curses.curs_set(0)
        screen.timeout(int(interval * 1000))
        prev = fetch(client)
        while True:
            key = screen.getch()  # waits up to `interval`
            if key in (ord("q"), ord("Q"), 27):
                return
            cur = fetch(client)
            screen.erase()
            height, width = screen.getmaxyx()
            for y, line in enumerate(render(prev, cur)[: height - 1]):
                screen.addnstr(y, 0, line, width - 1)
            screen.addnstr(height - 1, 0, "q: quit", width - 1)
            screen.refresh()
            prev = cur

    curses.wrapper(loop)
    return EXIT_OK


def _cmd_top(args: argparse.Namespace) -> int:
    from planemesh.agent.admin import AdminBindError
    from planemesh.agent.admin_client import AdminUnreachable

    if args.interval <= 0 or (args.iterations is not None and args.iterations < 1):
        sys.stderr.write("planemesh top: --interval must be > 0 and --iterations >= 1\n")
        return EXIT_UNREACHABLE
    try:
        client = AdminClient(args.admin)
        iterations = 1 if args.once else args.iterations
        if iterations is None and sys.stdout.isatty():
            return live(client, args.interval)
        return plain(client, sys.stdout, args.interval, iterations or 1)
    except AdminBindError as exc:
        sys.stderr.write(f"planemesh: --admin: {exc}\n")
    except AdminUnreachable as exc:
        sys.stderr.write(f"planemesh: {exc}\n")
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_UNREACHABLE


def add_top_command(subparsers: Any) -> None:
    p = subparsers.add_parser("top", help="live per-plane view of the running agent (q quits)")
    p.add_argument("--admin", type=first_admin, **option("top", "--admin"))
    p.add_argument("--interval", type=float, **option("top", "--interval"))
    p.add_argument("--once", action="store_true", **option("top", "--once"))
    p.add_argument("--iterations", type=int, **option("top", "--iterations"))
    p.set_defaults(func=_cmd_top)
