"""A flood on one plane beyond its rate limit gets 429s, not timeouts, and never errors another plane; nor does
a CPU-heavy flood that keeps that plane's worker busy."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.plane_isolation import heavy_backend, isolation_config, measure
from tests.netns.agent_lab import running_agent

pytestmark = pytest.mark.netns


def test_flooded_plane_is_limited_and_other_plane_keeps_its_sla(run_prefix: str, tmp_path: Path) -> None:
    config = isolation_config(tmp_path / "agent.yaml")
    with running_agent(f"{run_prefix}i", ["--config", str(config)]) as env, heavy_backend(env, tmp_path):
        iso = measure(env, seconds=3)
        heavy = measure(env, seconds=3, heavy=True)
    print(
        f"\noam p99 idle {iso.idle.p99_ms:.2f} ms, flooded {iso.flooded.p99_ms:.2f} ms; "
        f"media flood: {iso.flood.requests} requests, {iso.flood.non_2xx} non-2xx, {iso.flood.timeouts} timeouts"
    )
    # Plane B's excess is refused at once by its own rate limit (429), never left to time out...
    assert iso.flood.non_2xx > iso.flood.requests * 0.5
    assert iso.flood.timeouts == 0
    # ...and plane A sees no error at all, with its p99 far inside its 15 s request timeout.
    assert iso.idle.errors == 0 and iso.flooded.errors == 0
    assert iso.flooded.requests > 100
    assert iso.flooded.p99_ms < 1000
    # A CPU-heavy flood (media's worker busy streaming 1 MiB bodies) costs plane A no error either.
    print(f"CPU-heavy: oam p99 {heavy.flooded.p99_ms:.2f} ms; media {heavy.flood.requests} requests")
    assert heavy.flood.requests > 0 and heavy.flood.timeouts == 0
    assert heavy.idle.errors == 0 and heavy.flooded.errors == 0 and heavy.flooded.requests > 100
    assert heavy.flooded.p99_ms < 1000
