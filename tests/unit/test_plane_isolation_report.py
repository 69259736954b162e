"""The isolation bench's report (bench/plane_isolation.py): several rounds of a flood give the median ratio and
its range; the no-flood control is shown but never counted against the targets; who ran on oam's CPU
(bench/plane_isolation_cpu.py) is named per process and shown idle -> flooded."""

from __future__ import annotations

import json
import os

from bench.common import WrkResult
from bench.plane_isolation import Row, report
from bench.plane_isolation_cpu import BENCH, IDLE, KERNEL, OTHERS, _label
from bench.plane_isolation_lab import counted, describe_answers
from bench.plane_isolation_open import offered_rate, parse_open
from planemesh.labs.open_loop import Summary

RATE_ANSWERS = {"requests": 900, "non_2xx": 800, "timeouts": 0}


def _wrk(p99: float, rps: float) -> WrkResult:
    return WrkResult("oam", rps=rps, p50_ms=p99 / 4, p99_ms=p99, errors=0, requests=int(rps * 2))


def _row(flood: str, idle_p99: float, flooded_p99: float, others: float = 0.0) -> Row:
    answers = {"none": {}, "bandwidth": {"streams": 4, "mbit_s": 180.0}}.get(flood, RATE_ANSWERS)
    idle, flooded = {OTHERS: others, "oam worker": 600.0}, {OTHERS: others * 2, "oam worker": 610.0}
    return Row("cpusets", flood, _wrk(idle_p99, 8000), _wrk(flooded_p99, 7200), answers, idle, flooded)


def test_rounds_report_the_median_ratio_and_its_range_and_the_control_is_not_a_flood() -> None:
    rows = [_row("none", 4.0, 8.0), _row("none", 4.0, 4.0, 100.0), _row("none", 4.0, 2.0)]
    rows += [_row("bandwidth", 4.0, 3.6), _row("bandwidth", 4.0, 4.4), _row("bandwidth", 4.0, 6.4)]
    text = report(rows, 2.0, True, "sides", rounds=3)
    main = [line for line in text.splitlines() if line.startswith("| ") and " -> " not in line]  # not the ledger
    lines = {line.split(" | ")[0].strip("| "): line for line in main}
    # The control's second pair had neighbours on oam's CPU (100, 200 ms/s): left out of the figures.
    assert "| 1.25x (0.50-2.00) |" in lines["none"] and "no flood" in lines["none"]
    assert "| 2 / 3 (0) |" in lines["none"] and "| 3 / 3 (0) |" in lines["bandwidth"]
    assert "| 1.10x (0.90-1.60) |" in lines["bandwidth"] and "| 0.90x (0.90-0.90) |" in lines["bandwidth"]
    assert "| 0, 0 |" in lines["bandwidth"] and "| 0, 0 |" in lines["none"]  # medians of the others' ms/s
    assert "met for 1/1 floods, throughput target (>= 0.8x) for 1/1" in text  # the control is not counted


def test_a_round_without_any_answer_is_the_worst_ratio_not_the_best() -> None:
    silent = Row("cpusets", "rate", _wrk(4.0, 8000), WrkResult("oam", 0, 0, 0, 5, 0), RATE_ANSWERS)
    text = report([silent, _row("rate", 4.0, 4.0)], 2.0, True, "sides", rounds=2)
    assert "| - (1.00-1.00, some no answer) |" in text  # the median of "no answer" and 1.00: no figure
    assert "p99 target (<= 1.2x) met for 0/1" in text


def test_the_ledger_table_and_re_measured_pairs_are_reported() -> None:
    rows = [_row("connections", 4.0, 4.4, others=10.0), _row("connections", 4.0, 4.0, others=50.0)]
    rows[1].remeasured = 1
    text = report(rows, 2.0, True, "sides", rounds=2)
    flood = next(line for line in text.splitlines() if line.startswith("| connections") and " -> " in line)
    assert "| 600 -> 610 |" in flood and "| 30 -> 60 |" in flood  # oam worker; others: medians of 10/50, 20/100
    main = next(line for line in text.splitlines() if line.startswith("| connections") and " -> " not in line)
    assert "| 1.10x |" in main  # the clean pair alone (the other had 50, 100 ms/s of neighbours)
    assert "| 10, 20 | 1 / 2 (1) |" in main  # the clean pairs' others, 1 of 2 clean, one pair measured again


def test_each_pid_on_the_protected_cpu_gets_its_label() -> None:
    me = os.getpid()
    parents = {me: 1, 5001: me, 5002: 5001, 5003: 2, 5004: 1, 5005: me, 5006: me, 5007: 5006}
    threads = {5002: 5002, 5010: 5002, 5005: 5005}  # 5010: a thread of 5002
    by_pid = {0: 5.0, 5002: 10.0, 5010: 4.0, 5003: 3.0, 5004: 40.0, 5005: 600.0, 9999: 7.0, 5007: 300.0}
    got = _label(by_pid, {5005: "oam worker", 5006: "envoy"}, parents, threads)  # 5007: the launcher's child
    assert got == {IDLE: 5.0, BENCH: 14.0, KERNEL: 3.0, OTHERS: 47.0, "oam worker": 600.0, "envoy": 300.0}


def test_only_a_pinned_oam_has_pairs_left_out_for_neighbours() -> None:
    rows = [_row("rate", 4.0, 4.4, others=10.0), _row("rate", 4.0, 8.0, others=50.0)]
    for r in rows:
        r.variant = "shared"  # unpinned: oam's CPU is anyone's, its idle time filled by whatever runs
    line = next(x for x in report(rows, 2.0, True, "sides", rounds=2).splitlines() if x.startswith("| rate"))
    assert "| 1.55x (1.10-2.00) |" in line and "| 2 / 2 (0) |" in line


def test_media_answers_say_how_far_the_connection_flood_got_and_what_the_agent_counted() -> None:
    full = {"connections": 10_000, "connect_failed": 0, "closed": 8976, "notes": {"attempted": 10_000, "opened_s": 0.8}}
    full["agent"] = counted(
        {"accepted": 5, "refused (source share)": 0}, {"accepted": 10_005, "refused (source share)": 8976}
    )
    assert describe_answers("connections", full) == (
        "10000 of 10000 connected in 0.8 s (0 did not), 8976 closed by the proxy; "
        "agent counted 10000 accepted, 8976 refused (source share)"
    )
    starved = {"connections": 700, "connect_failed": 0, "closed": 0, "notes": {"attempted": 700}}
    assert (
        describe_answers("connections", starved)
        == "700 of 700 connected (deadline first) (0 did not), 0 closed by the proxy"
    )
    rate = {**RATE_ANSWERS, "agent": {"accepted": 64, "429": 800, "shed reqs": 0}}
    assert (
        describe_answers("rate", rate)
        == "900 requests, 800 non-2xx (429/503), 0 timeouts; agent counted 64 accepted, 800 429"
    )


def test_the_vms_floor_from_the_spin_control_is_printed_next_to_each_ratio() -> None:
    rows = [_row("spin", 4.0, 5.2), _row("spin", 4.0, 5.6), _row("rate", 4.0, 5.0), _row("bandwidth", 4.0, 4.4)]
    text = report(rows, 2.0, True, "sides", rounds=2)
    lines = {x.split(" | ")[0]: x for x in text.splitlines() if x.startswith("| ") and " -> " not in x}
    assert "| 1.25x | 1.35x |" in lines["| rate"]  # the flood's ratio, then the floor (median of 1.30x and 1.40x)
    assert "| 1.10x | 1.35x |" in lines["| bandwidth"]
    assert "busy loop on each other CPU" in lines["| spin"]
    verdict = text.splitlines()[-1]  # the controls are no floods: 2 floods, rate over the target, under the floor
    assert "p99 target (<= 1.2x) met for 1/2 floods" in verdict and "floor 1.35x" in verdict
    assert "for 2/2" in verdict.split("floor")[1]


def _open(p99: float, late: int = 0, no_answer: int = 0) -> Summary:
    return Summary(
        rate=4000.0, connections=8, seconds=2.0, scheduled=8000, answered=8000 - no_answer, no_answer=no_answer,
        non_2xx=0, p50_ms=0.3, p99_ms=p99, p999_ms=p99 * 2, max_ms=p99 * 3, late=late, own_lag_p99_ms=0.5, cpu_s=0.5,
    )  # fmt: skip


def test_the_open_loop_table_is_the_sla_figure_next_to_the_closed_loop_ratios() -> None:
    spin, rate, stalled = _row("spin", 4.0, 4.4), _row("rate", 4.0, 4.0), _row("cpu_heavy", 4.0, 4.0)
    spin.open_idle, spin.open_flooded = _open(2.0), _open(2.6)
    rate.open_idle, rate.open_flooded = _open(2.0), _open(2.2, late=80)
    stalled.open_idle, stalled.open_flooded = _open(2.0), _open(float("inf"), late=200, no_answer=100)
    text = report([spin, rate, stalled], 2.0, True, "sides")
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if "| 4000 |" in line}
    assert "| 2.00 -> 2.20 | **1.10x** | 4.00 -> 4.40 | 1.10x | 0.00%, 1.00% | 0, 0 | 0.50, 250 |" in lines["rate"]
    assert lines["rate"].endswith("| 1.00x | 0.90x |")  # the closed-loop ratios beside them
    assert "| 2.00 -> no answer | **-** |" in lines["cpu_heavy"] and "| 0, 100 |" in lines["cpu_heavy"]
    # The spin control's open-loop ratio is the floor; the closed-loop verdict is kept and says so.
    # rate: 80 of 8,000 late is 1%, within the budget (p99 within 10 ms); the stalled pair: 2.5%
    assert "open loop (the SLA figures): late (> 10 ms) <= 1% flooded for 1/2 floods" in text
    assert "p99 target (<= 1.2x) met for 1/2 floods" in text
    assert "within max(target, the open-loop VM floor 1.30x) for 1/2" in text
    assert "closed loop with cpusets: p99 target (<= 1.2x) met for 2/2" in text


def test_the_open_loop_rate_and_the_probes_output() -> None:
    assert offered_rate(None, 0.5, 8000.0) == 4000.0 and offered_rate(1500.0, 0.5, 8000.0) == 1500.0
    assert offered_rate(None, 0.5, 0.0) == 50.0  # oam answered nothing idle: still offer something
    good = json.dumps(_open(float("inf"), late=10, no_answer=10).to_json_dict())
    got = parse_open(f"noise\n{good}\n")
    assert isinstance(got, Summary) and got.p99_ms == float("inf") and got.no_answer == 10
    assert parse_open('{"error": "OSError: cannot connect"}\n') == "open-loop probe failed: OSError: cannot connect"
    assert str(parse_open("Traceback ...")).startswith("open-loop probe printed no summary")
