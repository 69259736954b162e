"""Istio's standard HTTP metrics from planemesh's per-route counters (pure; what `istio.stats` means here).

Dashboards built for Istio read `istio_requests_total` and `istio_request_duration_milliseconds` with Istio's
label names. planemesh's route counters know the plane, the listener and the cluster; istiod names its
clusters `outbound|<port>|<subset>|<host>` (a client's request: reporter "source") and
`inbound|<port>|<name>|<host>` (a request to a local workload: reporter "destination"), which gives the
destination service labels. Rows of clusters not named so are not Istio traffic and are left out.

The principals come from the proxy's handshakes (agent/proxy/istio_stats.py): `source_principal` and
`destination_principal` are SPIFFE IDs when the connection was mTLS (then `connection_security_policy`
is `mutual_tls`), else "unknown" (`none`). Relayed TCP connections of such clusters give
`istio_tcp_connections_opened_total`, `..._closed_total`, `istio_tcp_sent_bytes_total` (to the client) and
`istio_tcp_received_bytes_total` (from it).

Differences from istio-proxy, on purpose and minimal: `response_code` is the status class ("2xx", "5xx";
Istio's dashboards select on `response_code=~"5.*"`, which matches it), and the workload and
canonical-service labels are "unknown" (planemesh does not exchange peer metadata).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from planemesh.agent.metrics_text import CounterMetricFamily, HistogramMetricFamily, Metric

LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
)
UNKNOWN = "unknown"


def istio_labels(cluster: str, source: str = UNKNOWN, destination: str = UNKNOWN) -> dict[str, str] | None:
    """Istio's labels for a counter row of this cluster and peer identities, without response_code; None: not
    istio."""
    parts = cluster.split("|")
    if len(parts) != 4 or parts[0] not in ("outbound", "inbound") or not parts[1].isdigit():
        return None
    direction, _port, subset, host = parts
    name, _, rest = host.partition(".")
    namespace = rest.split(".", 1)[0] if rest else UNKNOWN
    out = dict.fromkeys(LABELS, UNKNOWN)
    out.update(
        reporter="source" if direction == "outbound" else "destination",
        destination_service=host or UNKNOWN,
        destination_service_name=name or UNKNOWN,
        destination_service_namespace=namespace or UNKNOWN,
        destination_version=(subset or UNKNOWN) if direction == "outbound" else UNKNOWN,
        request_protocol="http",
        response_flags="-",
        source_principal=source,
        destination_principal=destination,
        # mTLS proved an identity on this hop; without one, plaintext (or TLS without a client certificate)
        connection_security_policy="mutual_tls" if UNKNOWN not in (source, destination) else "none",
    )
    return out


def _labels_of(row: Any) -> dict[str, str] | None:
    return istio_labels(
        row.cluster, getattr(row, "source_principal", UNKNOWN), getattr(row, "destination_principal", UNKNOWN)
    )


def istio_families(rows: Sequence[Any]) -> Iterator[Metric]:
    """From agent.stats_report.RouteStats / IstioStats rows."""
    requests = CounterMetricFamily("istio_requests", "Requests (Istio standard metric)", labels=list(LABELS))
    duration = HistogramMetricFamily(
        "istio_request_duration_milliseconds", "Request duration (Istio standard metric)", labels=list(LABELS)
    )
    merged: dict[tuple[str, ...], tuple[int, list[int], float, tuple[float, ...]]] = {}
    totals: dict[tuple[str, ...], int] = {}
    tcp: dict[tuple[str, ...], list[int]] = {}
    for row in rows:
        labels = _labels_of(row)
        if labels is None:
            continue
        if getattr(row, "tcp_opened", 0):
            key = tuple({**labels, "request_protocol": "tcp", "response_code": "-"}[k] for k in TCP_LABELS)
            acc = tcp.setdefault(key, [0, 0, 0, 0])
            for i, name in enumerate(("tcp_opened", "tcp_closed", "tcp_sent_bytes", "tcp_received_bytes")):
                acc[i] += getattr(row, name)
        if not row.responses:
            continue
        for cls, n in row.responses.items():
            key = tuple({**labels, "response_code": cls}[k] for k in LABELS)
            totals[key] = totals.get(key, 0) + n
        # The latency histogram is per route, not per status: it goes with the row's most frequent class.
        top = max(row.responses.items(), key=lambda kv: kv[1])[0] if row.responses else UNKNOWN
        key = tuple({**labels, "response_code": top}[k] for k in LABELS)
        count, counts, total, bounds = merged.get(key, (0, [0] * len(row.latency.counts), 0.0, row.latency.bounds))
        counts = [a + b for a, b in zip(counts, row.latency.counts, strict=True)]
        merged[key] = (count + row.latency.count, counts, total + row.latency.sum_s, bounds)
    for key, n in sorted(totals.items()):
        requests.add_metric(list(key), n)
    for key, (_count, counts, total_s, bounds) in sorted(merged.items()):
        buckets, running = [], 0
        for bound, n in zip([*(repr(round(b * 1000, 6)) for b in bounds), "+Inf"], counts, strict=True):
            running += n
            buckets.append((bound, running))
        duration.add_metric(list(key), buckets=buckets, sum_value=total_s * 1000)
    yield requests
    yield duration
    yield from _tcp_families(tcp)


TCP_LABELS = tuple(k for k in LABELS if k not in ("response_code", "response_flags"))
_TCP = (
    ("istio_tcp_connections_opened", "TCP connections opened (Istio standard metric)"),
    ("istio_tcp_connections_closed", "TCP connections closed (Istio standard metric)"),
    ("istio_tcp_sent_bytes", "Bytes sent to the client during TCP connections (Istio standard metric)"),
    ("istio_tcp_received_bytes", "Bytes received from the client during TCP connections (Istio standard metric)"),
)


def _tcp_families(tcp: dict[tuple[str, ...], list[int]]) -> Iterator[Metric]:
    for i, (name, text) in enumerate(_TCP):
        family = CounterMetricFamily(name, text, labels=list(TCP_LABELS))
        for key, values in sorted(tcp.items()):
            family.add_metric(list(key), values[i])
        yield family
