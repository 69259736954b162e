"""bench/grpc.py's phase plan: by default each load runs for planemesh then Envoy (so both figures of one load
are taken seconds apart), --only narrows it to one load, --phases gives any sequence and rejects what it cannot
run; the per-call counts row divides the proxy's /proc counts by the calls of the load."""

from __future__ import annotations

import argparse

import pytest

from bench.grpc import COUNTS, Result, parse_phases, plan


def _args(only: str | None = None, phases: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(only=only, phases=phases)


def test_default_plan_puts_both_proxies_back_to_back_per_load() -> None:
    assert plan(_args()) == [
        ("planemesh", "get"), ("envoy", "get"), ("planemesh", "unary"), ("envoy", "unary"),
        ("planemesh", "grpcio"), ("envoy", "grpcio"), ("planemesh", "stream"), ("envoy", "stream"),
    ]  # fmt: skip
    assert plan(_args(only="unary")) == [("planemesh", "unary"), ("envoy", "unary")]


def test_phases_keep_their_order_and_default_to_planemesh() -> None:
    assert plan(_args(phases="unary, get,pm:unary,envoy:unary,planemesh:stream")) == [
        ("planemesh", "unary"), ("planemesh", "get"), ("planemesh", "unary"), ("envoy", "unary"),
        ("planemesh", "stream"),
    ]  # fmt: skip


@pytest.mark.parametrize("bad", ["unray", "nginx:unary", "envoy:", "envoy:get:x"])
def test_a_phase_it_cannot_run_is_a_clear_error(bad: str) -> None:
    with pytest.raises(SystemExit, match="--phases"):
        parse_phases(f"unary,{bad}")


def test_per_call_counts_divide_by_the_calls() -> None:
    r = Result("planemesh", "gRPC unary (h2load)", 1000.0, 1.0, 2.0, 0, 2000, backend_cpu_s=0.04)
    r.counts = dict(zip(COUNTS, (100, 80, 480_000, 990_000, 20), strict=True))
    r.probe_ms = (39.5, 41.25)
    assert r.per_call().split()[-9:] == ["0.050", "0.040", "240.0", "495.0", "0.010", "20.0", "39.5", "/", "41.2"]
