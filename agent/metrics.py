"""Metrics: the Prometheus families, built from the merged stats report (agent/stats_report.py) only when someone
scrapes. What each provider reports, and who provides it: agent/stats_report.py; the families: docs/operations.md,
"Metrics"."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from planemesh.agent.hbone.metrics import hbone_families
from planemesh.agent.identity.cert_metrics import certificate_families
from planemesh.agent.istio_metrics import istio_families
from planemesh.agent.metrics_text import (
    Collector,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from planemesh.agent.stats_report import (
    ClusterStats,
    DataPathStats,
    LatencyHistogram,
    ListenerStats,
    NodeShedStats,
    OverloadStats,
    PlaneGroupStats,
    RouteStats,
    StatsRegistry,
    StatsReport,
    TlsTerminationStats,
)


def _cumulative(hist: LatencyHistogram) -> list[tuple[str, float]]:
    buckets, running = [], 0
    for bound, n in zip([*map(repr, hist.bounds), "+Inf"], hist.counts, strict=True):
        running += n
        buckets.append((bound, running))
    return buckets


class PlanemeshCollector(Collector):
    """Builds every planemesh_* family from the registry at scrape time."""

    def __init__(self, stats: StatsRegistry, readiness_blockers: Callable[[], Sequence[str]] | None = None):
        self._stats = stats
        self._blockers = readiness_blockers

    def collect(self) -> Iterator[Metric]:
        report = self._stats.gather()
        yield from _route_families(report.routes)
        yield from _listener_families(report.listeners)
        yield from _cluster_families(report.clusters)
        yield from _datapath_families(report.datapath)
        yield from _xds_families(report)
        yield from _sniff_families(report)
        yield from _plane_group_families(report.plane_groups)
        yield from _overload_families(report.overload)
        yield from _node_shed_families(report.node_shed, report.overload)
        yield from istio_families([*report.routes, *report.istio])
        yield from _tls_families(report.tls)
        yield from certificate_families(report.certificates)
        yield from hbone_families(report.hbone, report.hbone_node)
        yield from self._agent_families()

    def _agent_families(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "planemesh_stats_provider_errors", "Stats providers that raised during a scrape", labels=["provider"]
        )
        for name, n in sorted(self._stats.provider_errors.items()):
            errors.add_metric([name], n)
        yield errors
        if self._blockers is not None:
            blockers = list(self._blockers())
            yield GaugeMetricFamily("planemesh_ready", "1 when no readiness blocker remains", value=int(not blockers))
            blocked = GaugeMetricFamily(
                "planemesh_readiness_blocker", "Readiness blockers still pending", labels=["blocker"]
            )
            for name in blockers:
                blocked.add_metric([name], 1)
            yield blocked


def _route_families(rows: Sequence[RouteStats]) -> Iterator[Metric]:
    labels = ["plane", "listener", "route", "cluster"]
    requests = CounterMetricFamily("planemesh_http_requests", "HTTP requests proxied", labels=labels)
    responses = CounterMetricFamily(
        "planemesh_http_responses", "HTTP responses by status class", labels=[*labels, "class"]
    )
    req_bytes = CounterMetricFamily("planemesh_http_request_bytes", "Request body bytes", labels=labels)
    resp_bytes = CounterMetricFamily("planemesh_http_response_bytes", "Response body bytes", labels=labels)
    latency = HistogramMetricFamily(
        "planemesh_http_request_duration_seconds", "Request latency through the proxy", labels=labels
    )
    flags = CounterMetricFamily(
        "planemesh_http_response_flags", "Responses by Envoy response flag (UF, UO, RL, ...)", labels=[*labels, "flag"]
    )
    for r in rows:
        values = [r.plane, r.listener, r.route, r.cluster]
        requests.add_metric(values, r.requests)
        for cls, n in sorted(r.responses.items()):
            responses.add_metric([*values, cls], n)
        req_bytes.add_metric(values, r.request_bytes)
        resp_bytes.add_metric(values, r.response_bytes)
        latency.add_metric(values, buckets=_cumulative(r.latency), sum_value=r.latency.sum_s)
        for flag, n in sorted(r.response_flags.items()):
            flags.add_metric([*values, flag], n)
    yield from (requests, responses, req_bytes, resp_bytes, latency, flags)


def _listener_families(rows: Sequence[ListenerStats]) -> Iterator[Metric]:
    labels = ["plane", "listener"]
    active = GaugeMetricFamily("planemesh_listener_active_connections", "Open downstream connections", labels=labels)
    total = CounterMetricFamily("planemesh_listener_connections", "Accepted downstream connections", labels=labels)
    limited = CounterMetricFamily("planemesh_rate_limited", "Requests refused by a local rate limit", labels=labels)
    errors = CounterMetricFamily("planemesh_listener_downstream_errors", "Malformed or reset requests", labels=labels)
    for r in rows:
        values = [r.plane, r.listener]
        active.add_metric(values, r.active_connections)
        total.add_metric(values, r.connections)
        limited.add_metric(values, r.rate_limited)
        errors.add_metric(values, r.downstream_errors)
    yield from (active, total, limited, errors)


def _cluster_families(rows: Sequence[ClusterStats]) -> Iterator[Metric]:
    labels = ["plane", "cluster"]
    active = GaugeMetricFamily("planemesh_cluster_active_connections", "Open upstream connections", labels=labels)
    failures = CounterMetricFamily("planemesh_cluster_connect_failures", "Upstream connect failures", labels=labels)
    retries = CounterMetricFamily("planemesh_cluster_retries", "Upstream request retries", labels=labels)
    ejections = CounterMetricFamily("planemesh_cluster_outlier_ejections", "Outlier ejections", labels=labels)
    overflows = CounterMetricFamily(
        "planemesh_cluster_circuit_breaker_overflows",
        "Requests refused by a circuit breaker",
        labels=[*labels, "resource"],
    )
    for r in rows:
        values = [r.plane, r.cluster]
        active.add_metric(values, r.active_connections)
        failures.add_metric(values, r.connect_failures)
        retries.add_metric(values, r.retries)
        ejections.add_metric(values, r.outlier_ejections)
        for resource, n in sorted(r.circuit_breaker_overflows.items()):
            overflows.add_metric([*values, resource], n)
    yield from (active, failures, retries, ejections, overflows)


def _datapath_families(rows: Sequence[DataPathStats]) -> Iterator[Metric]:
    packets = CounterMetricFamily(
        "planemesh_bpf_packets", "Packets by TC verdict (bypass stays in the kernel)", labels=["plane", "verdict"]
    )
    nbytes = CounterMetricFamily(
        "planemesh_bpf_bytes", "Bytes by TC verdict (bypass stays in the kernel)", labels=["plane", "verdict"]
    )
    attached = GaugeMetricFamily(
        "planemesh_bpf_interfaces_attached", "Plane interfaces with the TC program attached", labels=["plane"]
    )
    for r in rows:
        for verdict, n in sorted(r.packets.items()):
            packets.add_metric([r.plane, verdict], n)
        for verdict, n in sorted(r.bytes.items()):
            nbytes.add_metric([r.plane, verdict], n)
        attached.add_metric([r.plane], r.interfaces_attached)
    yield from (packets, nbytes, attached)


def _plane_group_families(rows: Sequence[PlaneGroupStats]) -> Iterator[Metric]:
    applied = GaugeMetricFamily(
        "planemesh_plane_limit_applied",
        "1 when a cgroup limit the plane's SLA asks for is in force, 0 when it could not be applied",
        labels=["plane", "limit"],
    )
    memory = GaugeMetricFamily(
        "planemesh_plane_memory_max_bytes", "memory.max of the plane's worker cgroup", labels=["plane"]
    )
    for r in rows:
        asked = ["cpu_weight", "memory"] + (["cpuset"] if r.cpus is not None else [])
        for limit in sorted(set(asked) | set(r.not_applied)):
            applied.add_metric([r.plane, limit], int(limit not in r.not_applied))
        if r.memory_max_bytes is not None:
            memory.add_metric([r.plane], r.memory_max_bytes)
    yield from (applied, memory)


def _xds_families(report: StatsReport) -> Iterator[Metric]:
    labels = ["type_url"]
    version = GaugeMetricFamily(
        "planemesh_xds_version_info", "Last ACKed xDS version per type (value is always 1)", labels=[*labels, "version"]
    )
    acks = CounterMetricFamily("planemesh_xds_acks", "xDS responses ACKed", labels=labels)
    nacks = CounterMetricFamily("planemesh_xds_nacks", "xDS responses NACKed", labels=labels)
    resources = GaugeMetricFamily("planemesh_xds_resources", "Resources held per type", labels=labels)
    for r in report.xds:
        version.add_metric([r.type_url, r.version], 1)
        acks.add_metric([r.type_url], r.acks)
        nacks.add_metric([r.type_url], r.nacks)
        resources.add_metric([r.type_url], r.resources)
    yield from (version, acks, nacks, resources)
    if report.xds_connected is not None:
        yield GaugeMetricFamily(
            "planemesh_xds_connected", "1 while the ADS stream is up", value=int(report.xds_connected)
        )


def _sniff_families(report: StatsReport) -> Iterator[Metric]:
    verdicts = CounterMetricFamily(
        "planemesh_sniff_connections", "Sniffed connections by verdict", labels=["plane", "verdict"]
    )
    sni = CounterMetricFamily("planemesh_sniff_tls_sni", "TLS connections by SNI", labels=["plane", "sni"])
    alpn = CounterMetricFamily(
        "planemesh_sniff_tls_alpn", "ALPN protocols offered by TLS clients", labels=["plane", "alpn"]
    )
    silent = CounterMetricFamily(
        "planemesh_sniff_silent_clients", "Clients silent until the sniff timeout", labels=["plane"]
    )
    active = GaugeMetricFamily(
        "planemesh_passthrough_active_connections", "Open passthrough connections", labels=["plane"]
    )
    total = CounterMetricFamily("planemesh_passthrough_connections", "Passthrough connections", labels=["plane"])
    nbytes = CounterMetricFamily(
        "planemesh_passthrough_bytes", "Bytes passed through (up: client to server)", labels=["plane", "direction"]
    )
    failures = CounterMetricFamily(
        "planemesh_passthrough_connect_failures", "Passthrough upstream connect failures", labels=["plane"]
    )
    no_upstream = CounterMetricFamily(
        "planemesh_passthrough_no_upstream", "SNI-routed connections whose cluster had no endpoint", labels=["plane"]
    )
    upstream_tls = CounterMetricFamily(
        "planemesh_passthrough_upstream_tls",
        "TLS originated on relayed TCP (handshakes; failed, of which san_refused and timeouts)",
        labels=["plane", "outcome"],
    )
    inner = CounterMetricFamily(
        "planemesh_sniff_mtls_inner_connections",
        "mTLS connections the sniffing listener terminated, by what their plaintext was",
        labels=["plane", "verdict"],
    )
    for r in report.sniff:
        for verdict, n in sorted(r.verdicts.items()):
            verdicts.add_metric([r.plane, verdict], n)
        for verdict, n in sorted(r.inner_verdicts.items()):
            inner.add_metric([r.plane, verdict], n)
        for name, n in sorted(r.sni.items()):
            sni.add_metric([r.plane, name], n)
        for proto, n in sorted(r.alpn.items()):
            alpn.add_metric([r.plane, proto], n)
        silent.add_metric([r.plane], r.silent_clients)
        active.add_metric([r.plane], r.passthrough_active)
        total.add_metric([r.plane], r.passthrough_connections)
        nbytes.add_metric([r.plane, "up"], r.passthrough_bytes_up)
        nbytes.add_metric([r.plane, "down"], r.passthrough_bytes_down)
        failures.add_metric([r.plane], r.connect_failures)
        no_upstream.add_metric([r.plane], r.no_upstream)
        for outcome, n in sorted(r.upstream_tls.items()):
            upstream_tls.add_metric([r.plane, outcome], n)
    routed = CounterMetricFamily(
        "planemesh_sni_routed_connections",
        "Passthrough connections per filter chain and SNI",
        labels=["plane", "chain", "sni"],
    )
    for r in report.sni_routes:
        routed.add_metric([r.plane, r.chain, r.sni], r.connections)
    yield from (verdicts, inner, sni, alpn, silent, active, total, nbytes, failures, no_upstream, upstream_tls, routed)


def _node_shed_families(levels: Sequence[NodeShedStats], overload: Sequence[OverloadStats]) -> Iterator[Metric]:
    """The node-wide overload: each plane's shed level (from the agent) and the requests its workers refused for
    the node's sake (their overload rows). Absent while node_overload is off and nothing was shed."""
    fraction = GaugeMetricFamily(
        "planemesh_node_shed_fraction",
        "Share of the plane's requests shed (503) because the node is overloaded (agent/node_pressure.py)",
        labels=["plane"],
    )
    requests = CounterMetricFamily(
        "planemesh_node_shed_requests",
        "Requests shed (503, x-planemesh-overloaded: node) for the node's sake",
        labels=["plane"],
    )
    for r in levels:
        fraction.add_metric([r.plane], r.fraction)
    for r in overload:
        requests.add_metric([r.plane], r.node_shed_requests)
    yield from (fraction, requests)


def _overload_families(rows: Sequence[OverloadStats]) -> Iterator[Metric]:
    labels = ["plane"]
    workers = GaugeMetricFamily(
        "planemesh_overload_workers", "Proxy workers at or above an overload level", labels=["plane", "level"]
    )
    memory = GaugeMetricFamily(
        "planemesh_worker_memory_bytes",
        "RSS growth of the plane's proxy workers since they started (what the overload manager compares)",
        labels=labels,
    )
    shed = CounterMetricFamily(
        "planemesh_overload_shed",
        "Requests and connections shed (503) by memory or node pressure",
        labels=["plane", "what"],
    )
    resets = CounterMetricFamily(
        "planemesh_overload_resets", "Connections reset at the hard memory threshold", labels=labels
    )
    refused = CounterMetricFamily(
        "planemesh_connections_refused_per_source", "Connections refused past a client address's share", labels=labels
    )
    idle = CounterMetricFamily(
        "planemesh_idle_connections_closed", "Idle connections closed early (unused, or pressure)", labels=labels
    )
    for r in rows:
        workers.add_metric([r.plane, "soft"], r.workers_soft)
        workers.add_metric([r.plane, "hard"], r.workers_hard)
        memory.add_metric([r.plane], r.memory_bytes)
        shed.add_metric([r.plane, "requests"], r.shed_requests)
        shed.add_metric([r.plane, "connections"], r.shed_connections)
        resets.add_metric([r.plane], r.resets)
        refused.add_metric([r.plane], r.source_refused)
        idle.add_metric([r.plane], r.idle_closed)
    yield from (workers, memory, shed, resets, refused, idle)


def _tls_families(rows: Sequence[TlsTerminationStats]) -> Iterator[Metric]:
    handshakes = CounterMetricFamily(
        "planemesh_tls_handshakes", "Completed TLS handshakes (termination)", labels=["plane"]
    )
    failed = CounterMetricFamily(
        "planemesh_tls_refused", "TLS connections refused, by reason (agent/proxy/tls.py)", labels=["plane", "reason"]
    )
    plain = CounterMetricFamily(
        "planemesh_tls_plaintext_accepted", "Plaintext connections on permissive TLS ports", labels=["plane"]
    )
    for r in rows:
        handshakes.add_metric([r.plane], r.handshakes)
        other = r.handshake_failed - r.peer_cert_refused - r.timeouts
        for reason, n in (("peer_certificate", r.peer_cert_refused), ("timeout", r.timeouts), ("san", r.san_refused),
                          ("plaintext", r.plaintext_refused), ("handshake", max(other, 0)),
                          ("overloaded", r.overloaded)):  # fmt: skip
            failed.add_metric([r.plane, reason], n)
        plain.add_metric([r.plane], r.plaintext_accepted)
    denied = CounterMetricFamily("planemesh_rbac_denied", "Requests refused (403) by RBAC filters", labels=["plane"])
    for r in rows:
        denied.add_metric([r.plane], r.rbac_denied)
    yield from (handshakes, failed, plain, denied)
