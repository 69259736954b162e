"""Prometheus families of the agent's workload certificate (istio's CSR flow, agent/identity/cert_client.py):
when it expires, how many were fetched, how many fetches failed. Rows are agent.metrics.WorkloadCertStats
(not imported: agent.metrics imports this module)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from planemesh.agent.metrics_text import CounterMetricFamily, GaugeMetricFamily, Metric


def certificate_families(rows: Sequence[Any]) -> Iterator[Metric]:
    if not rows:
        return
    expiry = GaugeMetricFamily(
        "planemesh_workload_certificate_expiry_timestamp_seconds",
        "notAfter of the workload certificate in use (0: none yet)",
        labels=["identity"],
    )
    fetched = CounterMetricFamily(
        "planemesh_workload_certificate_fetches", "Certificates received by CreateCertificate", labels=["identity"]
    )
    failed = CounterMetricFamily(
        "planemesh_workload_certificate_failures", "CreateCertificate calls refused or failed", labels=["identity"]
    )
    for row in rows:
        expiry.add_metric([row.identity], row.not_after_s)
        fetched.add_metric([row.identity], row.fetched)
        failed.add_metric([row.identity], row.failures)
    yield from (expiry, fetched, failed)
