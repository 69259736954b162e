"""A flood on one plane beyond its rate limit gets 429s, not timeouts, and never errors another plane; nor does
a CPU-heavy flood that keeps that plane's worker busy. Run through the isolation bench itself (its cgroups for
the probe, the flood and the servers; the planes pinned apart), so the bench is exercised by the suite too,
its ledger of who ran on oam's CPU included."""

from __future__ import annotations

import pytest

from bench.plane_isolation import run

pytestmark = pytest.mark.netns


def test_flooded_plane_is_limited_and_other_plane_keeps_its_sla(run_prefix: str) -> None:
    rate, heavy = run(f"{run_prefix}i", seconds=2, floods=["rate", "cpu_heavy"], variants=["cpusets"], retries=0)
    print(
        f"\noam p99 idle {rate.idle.p99_ms:.2f} ms, flooded {rate.flooded.p99_ms:.2f} ms; media flood: {rate.answers}"
    )
    # Plane B's excess is refused at once by its own rate limit (429), never left to time out...
    assert rate.answers["non_2xx"] > rate.answers["requests"] * 0.5
    assert rate.answers["timeouts"] == 0
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
