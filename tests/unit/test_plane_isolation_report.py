"""The isolation bench's report (bench/plane_isolation.py): several rounds of a flood give the median ratio and
its range; the no-flood control is shown but never counted against the targets."""

from __future__ import annotations

from bench.common import WrkResult
from bench.plane_isolation import Row, report

RATE_ANSWERS = {"requests": 900, "non_2xx": 800, "timeouts": 0}


def _wrk(p99: float, rps: float) -> WrkResult:
    return WrkResult("oam", rps=rps, p50_ms=p99 / 4, p99_ms=p99, errors=0, requests=int(rps * 2))


def _row(flood: str, idle_p99: float, flooded_p99: float, others: float = 0.0) -> Row:
    answers = {"none": {}, "bandwidth": {"streams": 4, "mbit_s": 180.0}}.get(flood, RATE_ANSWERS)
    return Row("cpusets", flood, _wrk(idle_p99, 8000), _wrk(flooded_p99, 7200), answers, others, others * 2)


def test_rounds_report_the_median_ratio_and_its_range_and_the_control_is_not_a_flood() -> None:
    rows = [_row("none", 4.0, 8.0), _row("none", 4.0, 4.0, 100.0), _row("none", 4.0, 2.0)]
    rows += [_row("bandwidth", 4.0, 3.6), _row("bandwidth", 4.0, 4.4), _row("bandwidth", 4.0, 6.4)]
    text = report(rows, 2.0, True, "sides", rounds=3)
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 1.00x (0.50-2.00) |" in lines["none"] and "no flood" in lines["none"]
    assert "| 1.10x (0.90-1.60) |" in lines["bandwidth"] and "| 0.90x (0.90-0.90) |" in lines["bandwidth"]
    assert "| 0, 0 |" in lines["bandwidth"] and "| 0, 0 |" in lines["none"]  # medians of the others' ms/s
    assert "met for 1/1 floods, throughput target (>= 0.8x) for 1/1" in text  # the control is not counted


def test_a_round_without_any_answer_is_the_worst_ratio_not_the_best() -> None:
    silent = Row("cpusets", "rate", _wrk(4.0, 8000), WrkResult("oam", 0, 0, 0, 5, 0), RATE_ANSWERS)
    text = report([silent, _row("rate", 4.0, 4.0)], 2.0, True, "sides", rounds=2)
    assert "| - (1.00-1.00, some no answer) |" in text  # the median of "no answer" and 1.00: no figure
    assert "p99 target (<= 1.2x) met for 0/1" in text
