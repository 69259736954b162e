"""The worker's overload manager (agent/proxy/overload.py) with a fake memory source: levels, keep-alive, and
which connections a hard overload resets (the biggest buffers first)."""

from __future__ import annotations

from dataclasses import dataclass

from planemesh.agent.proxy.overload import MIB, Level, OverloadManager, RssGrowth, read_rss


@dataclass
class FakeConn:
    name: str
    size: int
    aborted: bool = False

    def buffered_bytes(self) -> int:
        return self.size

    def abort(self) -> None:
        self.aborted = True


def test_levels_follow_memory_with_soft_at_80_and_hard_at_95_percent() -> None:
    om = OverloadManager(memory_max_mb=100, max_connections=1000)
    assert (om.level, om.shedding, om.keep_alive) == (Level.NORMAL, False, True)
    assert om.update(80 * MIB, 10) is Level.NORMAL  # at the threshold: not above
    assert om.update(81 * MIB, 10) is Level.SOFT and om.shedding and not om.keep_alive
    assert om.update(96 * MIB, 10) is Level.HARD and om.shedding
    assert om.update(50 * MIB, 10) is Level.NORMAL and not om.shedding and om.keep_alive  # recovers


def test_keep_alive_stops_near_the_connection_budget_without_shedding() -> None:
    om = OverloadManager(memory_max_mb=100, max_connections=1000)
    om.update(10 * MIB, 900)
    assert om.keep_alive
    om.update(10 * MIB, 901)
    assert not om.keep_alive and not om.shedding and om.level is Level.NORMAL


def test_hard_overload_resets_the_biggest_buffers_first_until_the_excess_is_covered() -> None:
    om = OverloadManager(memory_max_mb=100, max_connections=1000)
    conns = [
        FakeConn("small", 1 * MIB),
        FakeConn("huge", 12 * MIB),
        FakeConn("idle", 0),
        FakeConn("big", 8 * MIB),
        FakeConn("mid", 4 * MIB),
    ]
    assert om.victims(conns) == []  # normal: nobody
    om.update(90 * MIB, 5)
    assert om.victims(conns) == []  # soft: shed, reset nobody
    om.update(99 * MIB, 5)  # 19 MiB over the soft threshold (80 MiB): huge + big cover it
    assert [c.name for c in om.victims(conns)] == ["huge", "big"]
    om.update(97 * MIB, 5)  # 17 MiB: huge (12) is not enough, big (8) too
    assert [c.name for c in om.victims(conns)] == ["huge", "big"]
    om.update(96 * MIB, 5)
    assert [c.name for c in om.victims([FakeConn("idle", 0)])] == []  # nothing buffered: nothing to reset


def test_reconfigure_applies_at_once() -> None:
    om = OverloadManager(memory_max_mb=100, max_connections=1000)
    om.update(90 * MIB, 0)
    assert om.level is Level.SOFT
    om.configure(memory_max_mb=200, max_connections=1000)
    assert om.level is Level.NORMAL


def test_read_rss_reads_statm_and_survives_garbage(tmp_path) -> None:
    assert read_rss() > 1 * MIB  # this process
    bad = tmp_path / "statm"
    bad.write_text("garbage")
    assert read_rss(str(bad)) == 0
    assert read_rss(str(tmp_path / "missing")) == 0


def test_rss_growth_counts_from_its_creation() -> None:
    readings = iter([100 * MIB, 130 * MIB, 90 * MIB])
    growth = RssGrowth(lambda: next(readings))
    assert (growth.baseline, growth(), growth()) == (100 * MIB, 30 * MIB, 0)


def test_worker_stats_report_carries_the_overload_state_to_prometheus() -> None:
    from planemesh.agent.proxy.stats import PlaneStats
    from planemesh.agent.stats_report import StatsRegistry
    from planemesh.agent.worker_process import stats_report
    from tests.unit.test_ops_metrics import _scrape

    workers = []
    for level, rss in ((Level.HARD, 300 * MIB), (Level.SOFT, 200 * MIB)):  # two workers of one plane
        stats = PlaneStats()
        stats.overload_level, stats.memory_bytes = int(level), rss
        stats.shed_requests, stats.shed_connections, stats.overload_resets = 3, 2, int(level is Level.HARD)
        stats.source_refused, stats.idle_closed = 5, 7
        workers.append(stats_report("oam", stats))
    registry = StatsRegistry()
    for i, report in enumerate(workers):
        registry.register(f"worker{i}", lambda report=report: report)
    samples = _scrape(registry)
    plane = (("plane", "oam"),)
    assert samples[("planemesh_overload_workers", (("level", "soft"), *plane))] == 2
    assert samples[("planemesh_overload_workers", (("level", "hard"), *plane))] == 1
    assert samples[("planemesh_worker_memory_bytes", plane)] == 500 * MIB
    assert samples[("planemesh_overload_shed_total", (*plane, ("what", "requests")))] == 6
    assert samples[("planemesh_overload_shed_total", (*plane, ("what", "connections")))] == 4
    assert samples[("planemesh_overload_resets_total", plane)] == 1
    assert samples[("planemesh_connections_refused_per_source_total", plane)] == 10
    assert samples[("planemesh_idle_connections_closed_total", plane)] == 14
