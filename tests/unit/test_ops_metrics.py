"""Pull-model metrics: hot-path counters, provider coercion and merging, Prometheus rendering."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from planemesh.agent.metrics import PlanemeshCollector
from planemesh.agent.stats_report import (
    DEFAULT_LATENCY_BUCKETS_S,
    LatencyHistogram,
    RouteCounters,
    StatsRegistry,
    coerce_report,
    merge_reports,
)


def _scrape(stats: StatsRegistry) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlanemeshCollector(stats, lambda: ()))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "bucket"),
    [(0.0, 0), (0.0005, 0), (0.00051, 1), (1.0, 10), (30.0, len(DEFAULT_LATENCY_BUCKETS_S) - 1),
     (30.1, len(DEFAULT_LATENCY_BUCKETS_S))],
)  # fmt: skip
def test_histogram_bucket_is_le_bound(value, bucket):
    hist = LatencyHistogram()
    hist.observe(value)
    assert hist.counts[bucket] == 1 and hist.count == 1


def test_histogram_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="needs 3 counts"):
        LatencyHistogram((0.1, 1.0), [1, 2])
    with pytest.raises(ValueError, match="different buckets"):
        LatencyHistogram((0.1,)).merged(LatencyHistogram((0.2,)))


def test_route_counters_snapshot_is_a_copy():
    counters = RouteCounters("media", "media_80", "r1", "c1")
    counters.record(200, 0.002, 10, 300)
    counters.record(503, 0.5)
    counters.record(999, 0.1)  # nonsense status: counted as a request, in no class
    snap = counters.snapshot()
    counters.record(200, 0.002)
    assert snap.requests == 3 and snap.responses == {"2xx": 1, "5xx": 1}
    assert snap.request_bytes == 10 and snap.response_bytes == 300 and snap.latency.count == 3


def test_dict_reports_are_coerced_and_bad_ones_rejected():
    report = coerce_report({
        "routes": [{"plane": "oam", "listener": "l", "route": "r", "cluster": "c", "requests": 2,
                    "latency": {"bounds": [0.1, 1.0], "counts": [1, 1, 0], "sum_s": 0.6}}],
        "xds_connected": False,
    })  # fmt: skip
    assert report.routes[0].latency.count == 2 and report.xds_connected is False
    with pytest.raises(ValueError, match="unknown stats keys: bogus"):
        coerce_report({"bogus": []})
    with pytest.raises(TypeError):
        coerce_report({"listeners": [{"plane": "oam", "listener": "l", "nope": 1}]})
    with pytest.raises(TypeError):
        coerce_report([1, 2])  # type: ignore[arg-type]


def test_merge_sums_equal_labels_and_never_mutates_inputs():
    a = coerce_report({"clusters": [{"plane": "oam", "cluster": "c", "retries": 1,
                                     "circuit_breaker_overflows": {"pending": 1}}]})  # fmt: skip
    b = coerce_report({"clusters": [{"plane": "oam", "cluster": "c", "retries": 2,
                                     "circuit_breaker_overflows": {"pending": 2, "requests": 5}}],
                       "xds": [{"type_url": "t", "version": "v2", "acks": 1}]})  # fmt: skip
    merged = merge_reports([a, b])
    assert merged.clusters[0].retries == 3
    assert merged.clusters[0].circuit_breaker_overflows == {"pending": 3, "requests": 5}
    assert a.clusters[0].circuit_breaker_overflows == {"pending": 1}
    assert merged.xds[0].version == "v2" and merged.xds_connected is None


def test_collector_values_and_provider_errors():
    stats = StatsRegistry()
    counters = RouteCounters("oam", "oam_80", "default", "backend")
    for status, latency in ((200, 0.001), (200, 0.004), (404, 0.02)):
        counters.record(status, latency)
    stats.register("proxy", lambda: {"routes": [counters.snapshot()]})
    stats.register("bad", lambda: 1 / 0)
    samples = _scrape(stats)
    labels = (("cluster", "backend"), ("listener", "oam_80"), ("plane", "oam"), ("route", "default"))
    assert samples[("planemesh_http_requests_total", labels)] == 3
    assert samples[("planemesh_http_responses_total", tuple(sorted((*labels, ("class", "4xx")))))] == 1
    assert samples[("planemesh_http_request_duration_seconds_bucket", tuple(sorted((*labels, ("le", "0.005")))))] == 2
    assert samples[("planemesh_stats_provider_errors_total", (("provider", "bad"),))] == 1
    assert samples[("planemesh_ready", ())] == 1
    stats.unregister("bad")
    assert _scrape(stats)[("planemesh_stats_provider_errors_total", (("provider", "bad"),))] == 1


def test_response_flags_and_bpf_bytes_reach_prometheus():
    """A worker's response flags (each flag of "UF,URX" once) and the BPF byte counters are exposed per plane."""
    from planemesh.agent.proxy.stats import PlaneStats
    from planemesh.agent.worker_process import stats_report

    plane = PlaneStats()
    plane.record_response(503, 1.0, 0, 20, "UF,URX")
    plane.record_response(503, 1.0, 0, 20, "UF")
    plane.record_response(200, 1.0, 0, 20)
    stats = StatsRegistry()
    stats.register("worker", lambda: stats_report("oam", plane))
    stats.register("bpf", lambda: {"datapath": [{"plane": "oam", "packets": {"bypass": 3}, "bytes": {"bypass": 180}}]})
    got = _scrape(stats)
    base = (("cluster", "all"), ("listener", "oam"), ("plane", "oam"), ("route", "all"))
    assert got[("planemesh_http_response_flags_total", (*base[:1], ("flag", "UF"), *base[1:]))] == 2
    assert got[("planemesh_http_response_flags_total", (*base[:1], ("flag", "URX"), *base[1:]))] == 1
    assert got[("planemesh_bpf_bytes_total", (("plane", "oam"), ("verdict", "bypass")))] == 180
    assert got[("planemesh_bpf_packets_total", (("plane", "oam"), ("verdict", "bypass")))] == 3
