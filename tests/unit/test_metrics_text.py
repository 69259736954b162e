"""The admin's Prometheus writer (agent/metrics_text.py) writes the bytes prometheus_client writes for the same
families (prometheus_client is a test dependency only: the agent no longer imports it, ~3.6 MB of RSS)."""

from __future__ import annotations

import subprocess
import sys

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from planemesh.agent import metrics_text
from planemesh.agent.metrics import PlanemeshCollector
from planemesh.agent.metrics_text import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    ProcessCollector,
    float_text,
    generate_latest,
)
from planemesh.agent.proxy.stats import PlaneStats
from planemesh.agent.stats_report import RouteCounters, StatsRegistry
from planemesh.agent.worker_process import stats_report


class Fixed:
    def __init__(self, *families) -> None:
        self.families = families

    def collect(self):
        return list(self.families)


def _families():
    odd = CounterMetricFamily("pm_odd_total", 'help with \\ and \n and "quotes"', labels=["plane", "path"])
    odd.add_metric(["o\"a\\m", "a\nb"], 3)
    odd.add_metric(["media", "ü/ß"], 2.5)
    big = GaugeMetricFamily("pm_big", "large and special values", labels=["k"])
    for i, v in enumerate([0, 1, -1, 1e7, 123456789.0, 1234567.5, 0.1, float("inf"), float("-inf"), float("nan")]):
        big.add_metric([str(i)], v)
    hist = HistogramMetricFamily("pm_latency_seconds", "latency", labels=["plane"])
    hist.add_metric(["oam"], [("0.005", 2), ("0.1", 3), ("+Inf", 4)], sum_value=0.25)
    return [odd, big, hist, GaugeMetricFamily("pm_single", "no labels", value=7),
            CounterMetricFamily("pm_plain", "no labels either", value=1)]  # fmt: skip


def _planemesh_collector() -> PlanemeshCollector:
    stats = StatsRegistry()
    counters = RouteCounters("oam", "oam_80", "default", "backend")
    for status, latency in ((200, 0.001), (503, 0.2)):
        counters.record(status, latency)
    plane = PlaneStats()
    plane.record_response(503, 1.0, 0, 20, "UF,URX")
    stats.register("proxy", lambda: {"routes": [counters.snapshot()]})
    stats.register("worker", lambda: stats_report("oam", plane))
    return PlanemeshCollector(stats, lambda: ("xds",))


def test_same_bytes_as_prometheus_client_for_every_family_shape_and_escape() -> None:
    for collector in (Fixed(*_families()), _planemesh_collector()):
        ours = CollectorRegistry()
        ours.register(collector)
        theirs = prometheus_client.CollectorRegistry(auto_describe=False)
        theirs.register(collector)
        assert generate_latest(ours) == prometheus_client.generate_latest(theirs)


def test_values_are_written_as_go_writes_them() -> None:
    from prometheus_client.utils import floatToGoString

    for v in (0, 5, 0.5, 1e6, 1e7, 1234567.0, 12345678.9, 1e300, -2.5, float("inf"), float("nan")):
        assert float_text(v) == floatToGoString(v)


def test_process_families_match_prometheus_clients() -> None:
    ours = CollectorRegistry()
    ProcessCollector(registry=ours)
    theirs = prometheus_client.CollectorRegistry(auto_describe=False)
    prometheus_client.ProcessCollector(registry=theirs)

    def shape(text: bytes) -> list[tuple[str, str, str]]:
        return [(f.name, f.type, f.documentation) for f in text_string_to_metric_families(text.decode())]

    got = shape(generate_latest(ours))
    assert got == shape(prometheus_client.generate_latest(theirs)) and len(got) == 6
    rss = next(s.value for f in text_string_to_metric_families(generate_latest(ours).decode()) for s in f.samples
               if s.name == "process_resident_memory_bytes")  # fmt: skip
    assert rss > 1_000_000


def test_the_admin_app_does_not_load_prometheus_client() -> None:
    code = "import sys, planemesh.agent.admin, planemesh.agent.admin_glue; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False", metrics_text.__doc__
