"""A flood on one plane beyond its rate limit gets 429s, not timeouts, and never errors another plane; nor does
a CPU-heavy flood that keeps that plane's worker busy, nor 10,000 idle connections (the excess refused at once,
counted). Run through the isolation bench itself (its cgroups for the probe, the flood and the servers; the
planes pinned apart), so the bench is exercised by the suite too, its ledger of who ran on oam's CPU included."""

from __future__ import annotations

import pytest

from bench.plane_isolation import run

pytestmark = pytest.mark.netns


def test_flooded_plane_is_limited_and_other_plane_keeps_its_sla(run_prefix: str) -> None:
    rate, heavy, conns = run(
        f"{run_prefix}i", seconds=2, floods=["rate", "cpu_heavy", "connections"], variants=["cpusets"], retries=0
    )
    print(
        f"\noam p99 idle {rate.idle.p99_ms:.2f} ms, flooded {rate.flooded.p99_ms:.2f} ms; media flood: {rate.answers}"
    )
    # Plane B's excess is refused at once by its own rate limit (429), never left to time out...
    assert rate.answers["non_2xx"] > rate.answers["requests"] * 0.5
    assert rate.answers["timeouts"] == 0
    # The agent counted them, and the flood's connections were kept alive: 429s are answered on the connection
    # that asked (a close per 429 made the flood reconnect per request; its TIME_WAITs then starved the
    # connection flood that followed).
    assert rate.answers["agent"]["429"] >= rate.answers["non_2xx"] * 0.9
    assert rate.answers["agent"]["accepted"] < 1000 < rate.answers["requests"]
    # ...and plane A sees no error at all, with its p99 far inside its 15 s request timeout.
    assert rate.idle.errors == 0 and rate.flooded.errors == 0
    assert rate.flooded.requests > 100
    assert rate.flooded.p99_ms < 1000
    # A CPU-heavy flood (media's worker busy streaming 1 MiB bodies) costs plane A no error either.
    print(f"CPU-heavy: oam p99 {heavy.flooded.p99_ms:.2f} ms; media {heavy.answers}")
    assert heavy.answers["requests"] > 0 and heavy.answers["timeouts"] == 0
    assert heavy.idle.errors == 0 and heavy.flooded.errors == 0 and heavy.flooded.requests > 100
    assert heavy.flooded.p99_ms < 1000
    # The bench's ledger of oam's CPU (bench/plane_isolation_cpu.py) names who ran there: oam's pinned worker,
    # its nginx and the probe; nothing of media's side (its worker, the flood, its servers are on other CPUs).
    print(f"oam's CPU, idle: {rate.cpu_idle}; flooded: {rate.cpu_flooded}")
    for probe in (rate.cpu_idle, rate.cpu_flooded):
        assert probe.get("oam worker", 0) > 100 and probe.get("probe", 0) > 20 and probe.get("oam-server", 0) > 20
        assert sum(probe.get(x, 0) for x in ("media worker", "flood", "flood-servers")) < 20
    # 10,000 idle connections from one address, after the rate and CPU-heavy floods: all of them tried and
    # connected, media's worker keeps the address's share (max_connections // 4 = 1024) and answers every
    # connection past it at once (503 and close), counted; oam sees no error.
    print(f"connections: {conns.answers['notes']}, {conns.answers['closed']} closed, agent {conns.answers['agent']}")
    assert conns.answers["notes"]["attempted"] == 10_000 and conns.answers["connections"] == 10_000
    share = 4096 // 4
    assert conns.answers["closed"] == 10_000 - share == conns.answers["agent"]["refused (source share)"]
    assert conns.idle.errors == 0 and conns.flooded.errors == 0 and conns.flooded.requests > 100
    # The open-loop probe (fixed rate, latency from each request's due time) ran through the agent idle and
    # under each flood: it offered its rate and every request was answered within its drain time.
    for row in (rate, heavy, conns):
        print(f"{row.flood}: open loop {row.open_idle}, flooded {row.open_flooded}")
        assert row.open_error == "" and row.open_idle is not None and row.open_flooded is not None
        assert row.open_flooded.scheduled == row.open_idle.scheduled > 100
        assert row.open_idle.no_answer == 0 and row.open_flooded.no_answer == 0 and row.open_flooded.non_2xx == 0
        assert row.open_flooded.p99_ms < 1000
