"""istio.stats: Istio's standard metric names and labels from planemesh's route counters, as scraped."""

from __future__ import annotations

import pytest

from planemesh.agent.istio_metrics import istio_labels
from planemesh.agent.stats_report import RouteCounters, StatsRegistry
from tests.unit.test_ops_metrics import _scrape


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        (
            "outbound|9080|v1|reviews.default.svc.cluster.local",
            {"reporter": "source", "destination_service": "reviews.default.svc.cluster.local",
             "destination_service_name": "reviews", "destination_service_namespace": "default",
             "destination_version": "v1"},
        ),
        (
            "outbound|53||kube-dns.kube-system.svc.cluster.local",
            {"reporter": "source", "destination_service_name": "kube-dns", "destination_version": "unknown"},
        ),
        (
            "inbound|9080|http|productpage.default.svc.cluster.local",
            {"reporter": "destination", "destination_service_name": "productpage", "destination_version": "unknown"},
        ),
        ("backend", None),
        ("outbound|x||svc", None),
        ("PassthroughCluster", None),
    ],
)  # fmt: skip
def test_labels_from_istiod_cluster_names(cluster, expected):
    labels = istio_labels(cluster)
    if expected is None:
        assert labels is None
    else:
        assert labels is not None and expected.items() <= labels.items()


def test_istio_requests_total_and_duration_are_scraped():
    stats = StatsRegistry()
    istio = RouteCounters("pod", "0.0.0.0_9080@pod", "default", "outbound|9080|v1|reviews.default.svc.cluster.local")
    for status, latency in ((200, 0.004), (200, 0.004), (503, 0.02)):
        istio.record(status, latency)
    other = RouteCounters("pod", "l", "default", "backend")
    other.record(200, 0.001)
    stats.register("proxy", lambda: {"routes": [istio.snapshot(), other.snapshot()]})
    samples = _scrape(stats)
    ok = {k: v for k, v in samples.items() if k[0] == "istio_requests_total" and ("response_code", "2xx") in k[1]}
    assert list(ok.values()) == [2]
    (labels,) = [dict(k[1]) for k in ok]
    assert labels["reporter"] == "source" and labels["destination_service_name"] == "reviews"
    assert labels["destination_version"] == "v1" and labels["source_workload"] == "unknown"
    errors = [v for k, v in samples.items() if k[0] == "istio_requests_total" and ("response_code", "5xx") in k[1]]
    assert errors == [1]
    buckets = {dict(k[1])["le"]: v for k, v in samples.items() if k[0] == "istio_request_duration_milliseconds_bucket"}
    assert buckets["5.0"] == 2 and buckets["+Inf"] == 3  # milliseconds, Istio's unit
    total = [v for k, v in samples.items() if k[0] == "istio_request_duration_milliseconds_sum"]
    assert total == [pytest.approx(28.0)]
    assert not any(dict(k[1]).get("destination_service") == "backend" for k, _v in samples.items())
