"""What the sniffing listener found inside terminated mTLS reaches /stats: each worker's SniffStats row,
summed over workers, as planemesh_sniff_mtls_inner_connections{plane,verdict}."""

from __future__ import annotations

from planemesh.agent.proxy.passthrough import SniffStats
from planemesh.agent.stats_report import StatsRegistry
from planemesh.agent.worker_process import sniff_rows
from tests.unit.test_ops_metrics import _scrape


def test_inner_verdicts_are_summed_over_workers_and_exported():
    stats = StatsRegistry()
    for worker, (http1, opaque) in enumerate(((2, 1), (3, 0))):
        s = SniffStats()
        s.inner_kinds["http1"] += http1
        s.inner_kinds["opaque"] += opaque
        rows = sniff_rows("pod", s)
        stats.register(f"w{worker}", lambda rows=rows: rows)
    got = _scrape(stats)
    name = "planemesh_sniff_mtls_inner_connections_total"
    assert got[(name, (("plane", "pod"), ("verdict", "http1")))] == 5
    assert got[(name, (("plane", "pod"), ("verdict", "opaque")))] == 1
    assert got[(name, (("plane", "pod"), ("verdict", "h2")))] == 0
