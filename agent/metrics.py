"""Metrics: plain counters on the hot path, Prometheus families built only when someone scrapes.

Components register *providers*: zero-argument callables returning a `StatsReport` (or a dict with the
same keys, each a list of dicts with the fields of the matching dataclass below). The collector calls every
provider at scrape time, sums rows with equal labels (several proxy workers may report the same listener),
and yields Prometheus families. A provider that raises is logged and counted; the scrape still succeeds.

Who provides what (see docs/operations.md, "Metrics"):
- proxy workers: `RouteStats` (per plane/listener/route/cluster), `ListenerStats`, `ClusterStats`
- data path (ebpf): `DataPathStats` (per plane, verdict -> packets and bytes)
- HBONE node (agent/hbone/supervisor.py): `HbonePeerStats` per peer node and direction, `HboneNodeStats`
- xDS client: `XdsTypeStats` (per type URL: version, ACKs, NACKs, resource count), `xds_connected`
- proxy workers with a sniffing listener: `SniffListenerStats` (verdicts, SNI, ALPN, passthrough connections and
  bytes), `SniRouteStats` (passthrough connections per filter chain and SNI)
- proxy workers: `OverloadStats` (per plane: workers at each overload level, their memory, shed requests and
  connections, resets, per-source refusals, idle connections closed early; requests shed for the node's sake)
- node overload loop (agent/node_overload.py): `NodeShedStats` (per plane: the share of requests it sheds now)
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from planemesh.agent.hbone.metrics import PEER_KEY, HboneNodeStats, HbonePeerStats, hbone_families
from planemesh.agent.identity.cert_metrics import certificate_families
from planemesh.agent.istio_metrics import istio_families

log = logging.getLogger(__name__)

# Request latency buckets (seconds): sub-millisecond proxying up to the longest SLA timeouts.
DEFAULT_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

RESPONSE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
CIRCUIT_BREAKER_RESOURCES = ("connections", "pending", "requests", "retries")


@dataclass(slots=True)
class LatencyHistogram:
    """Per-bucket counts (not cumulative): counts[i] for value <= bounds[i], counts[-1] for the overflow."""

    bounds: tuple[float, ...] = DEFAULT_LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    sum_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"histogram needs {len(self.bounds) + 1} counts, got {len(self.counts)}")

    def observe(self, value_s: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value_s)] += 1
        self.sum_s += value_s

    @property
    def count(self) -> int:
        return sum(self.counts)

    def merged(self, other: LatencyHistogram) -> LatencyHistogram:
        if tuple(other.bounds) != tuple(self.bounds):
            raise ValueError("cannot merge histograms with different buckets")
        return LatencyHistogram(
            tuple(self.bounds),
            [a + b for a, b in zip(self.counts, other.counts, strict=True)],
            self.sum_s + other.sum_s,
        )


@dataclass(slots=True)
class RouteStats:
    plane: str
    listener: str
    route: str
    cluster: str
    requests: int = 0
    responses: dict[str, int] = field(default_factory=dict)  # "2xx" -> count
    request_bytes: int = 0
    response_bytes: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    response_flags: dict[str, int] = field(default_factory=dict)  # Envoy response flag (UF, UO, RL, ...) -> count


@dataclass(slots=True)
class ListenerStats:
    plane: str
    listener: str
    active_connections: int = 0
    connections: int = 0  # accepted, total
    rate_limited: int = 0  # requests refused by the local rate limit (listener filter or plane SLA)
    downstream_errors: int = 0  # malformed requests, resets before a response


@dataclass(slots=True)
class ClusterStats:
    plane: str
    cluster: str
    active_connections: int = 0
    connect_failures: int = 0
    retries: int = 0
    outlier_ejections: int = 0
    circuit_breaker_overflows: dict[str, int] = field(default_factory=dict)  # resource -> count


@dataclass(slots=True)
class DataPathStats:
    plane: str
    packets: dict[str, int] = field(default_factory=dict)  # BPF verdict name -> packets (bypass, proxy, ...)
    bytes: dict[str, int] = field(default_factory=dict)  # BPF verdict name -> bytes
    interfaces_attached: int = 0


@dataclass(slots=True)
class PlaneGroupStats:
    """A plane's worker cgroup (agent/cpu_groups.py): the limits asked for and those the kernel did not take."""

    plane: str
    cpu_weight: int = 100
    cpus: str | None = None  # the SLA's cpu list; None: no cpuset asked
    cpus_effective: str | None = None  # the CPUs the kernel lets the workers run on
    memory_max_bytes: int | None = None  # in force (None: no limit, or not applied)
    memory_high_bytes: int | None = None
    not_applied: dict[str, str] = field(default_factory=dict)  # cpu_weight/cpuset/memory -> why


@dataclass(slots=True)
class XdsTypeStats:
    type_url: str
    version: str = ""
    acks: int = 0
    nacks: int = 0
    resources: int = 0


@dataclass(slots=True)
class SniffListenerStats:
    """A plane's sniffing listener (undeclared ports, SNI-routed TCP ports); see agent/proxy/passthrough.py."""

    plane: str
    verdicts: dict[str, int] = field(default_factory=dict)  # http1, h2, tls, opaque -> connections
    inner_verdicts: dict[str, int] = field(default_factory=dict)  # inside terminated mTLS (agent/proxy/sniff_tls.py)
    sni: dict[str, int] = field(default_factory=dict)  # TLS server name -> connections
    alpn: dict[str, int] = field(default_factory=dict)  # ALPN protocol offered -> connections
    silent_clients: int = 0  # nothing sent within the sniff timeout (server-first protocols)
    passthrough_active: int = 0
    passthrough_connections: int = 0
    passthrough_bytes_up: int = 0  # client -> server
    passthrough_bytes_down: int = 0  # server -> client
    connect_failures: int = 0
    no_upstream: int = 0  # an SNI-routed chain's cluster had no endpoint or a full connection breaker


@dataclass(slots=True)
class SniRouteStats:
    plane: str
    chain: str  # filter chain (planemesh listener) name
    sni: str  # "(none)": no SNI
    connections: int = 0


@dataclass(slots=True)
class OverloadStats:
    """A plane's workers' overload manager and connection share (agent/proxy/overload.py, limits.py); rows of the
    plane's workers are summed, so the levels are counts of workers."""

    plane: str
    workers_soft: int = 0  # workers above their memory soft threshold (shedding, no keep-alive)
    workers_hard: int = 0  # of those, workers above the hard threshold (resetting the biggest buffers)
    memory_bytes: int = 0  # RSS growth of the plane's workers since they started (agent/proxy/overload.py RssGrowth)
    shed_requests: int = 0  # requests answered 503 (x-planemesh-overloaded: memory or node)
    shed_connections: int = 0  # new connections answered 503 (memory)
    resets: int = 0  # connections reset at the hard threshold
    source_refused: int = 0  # connections refused: their client address held its share
    idle_closed: int = 0  # idle connections closed early (never used, or under pressure)
    node_shed_requests: int = 0  # of shed_requests, those refused for the node's sake (x-planemesh-overloaded: node)


@dataclass(slots=True)
class NodeShedStats:
    """The node-wide overload loop's level for one plane (agent/node_overload.py): one provider, no sums."""

    plane: str
    fraction: float = 0.0  # share of the plane's requests its workers refuse now (0, 0.25, ... 1)


@dataclass(slots=True)
class IstioStats:
    """Istio's standard metrics of one istiod-named cluster and pair of peer identities (agent/proxy/istio_stats.py)."""

    plane: str
    cluster: str
    source_principal: str = "unknown"
    destination_principal: str = "unknown"
    responses: dict[str, int] = field(default_factory=dict)  # "2xx" -> count
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    tcp_opened: int = 0
    tcp_closed: int = 0
    tcp_sent_bytes: int = 0  # Istio: response bytes (destination -> source), what the proxy sent the client
    tcp_received_bytes: int = 0  # Istio: request bytes (source -> destination), what the client sent


@dataclass(slots=True)
class WorkloadCertStats:
    """The agent's workload certificate from istio's CSR flow (agent/identity/cert_client.py)."""

    identity: str
    not_after_s: float = 0.0  # Unix time; 0: none yet
    fetched: int = 0
    failures: int = 0


@dataclass(slots=True)
class TlsTerminationStats:
    """A plane's TLS termination (agent/proxy/tls.py TlsStats); rows of the plane's workers are summed."""

    plane: str
    handshakes: int = 0
    handshake_failed: int = 0
    peer_cert_refused: int = 0  # wrong CA, expired, missing where required
    timeouts: int = 0
    san_refused: int = 0
    plaintext_refused: int = 0  # plaintext on a TLS-only port
    plaintext_accepted: int = 0  # plaintext on a permissive port
    overloaded: int = 0  # closed before the handshake: the plane's max_connections were open
    rbac_denied: int = 0  # requests refused (403) by RBAC (agent/proxy/authz.py)


@dataclass(slots=True)
class StatsReport:
    routes: list[RouteStats] = field(default_factory=list)
    listeners: list[ListenerStats] = field(default_factory=list)
    clusters: list[ClusterStats] = field(default_factory=list)
    datapath: list[DataPathStats] = field(default_factory=list)
    xds: list[XdsTypeStats] = field(default_factory=list)
    xds_connected: bool | None = None
    sniff: list[SniffListenerStats] = field(default_factory=list)
    sni_routes: list[SniRouteStats] = field(default_factory=list)
    plane_groups: list[PlaneGroupStats] = field(default_factory=list)
    overload: list[OverloadStats] = field(default_factory=list)
    tls: list[TlsTerminationStats] = field(default_factory=list)
    istio: list[IstioStats] = field(default_factory=list)
    certificates: list[WorkloadCertStats] = field(default_factory=list)
    node_shed: list[NodeShedStats] = field(default_factory=list)
    hbone: list[HbonePeerStats] = field(default_factory=list)  # agent/hbone/metrics.py
    hbone_node: list[HboneNodeStats] = field(default_factory=list)


_ROW_TYPES = {
    "routes": RouteStats,
    "listeners": ListenerStats,
    "clusters": ClusterStats,
    "datapath": DataPathStats,
    "xds": XdsTypeStats,
    "sniff": SniffListenerStats,
    "tls": TlsTerminationStats,
    "istio": IstioStats,
    "certificates": WorkloadCertStats,
    "sni_routes": SniRouteStats,
    "plane_groups": PlaneGroupStats,
    "overload": OverloadStats,
    "node_shed": NodeShedStats,
    "hbone": HbonePeerStats,
    "hbone_node": HboneNodeStats,
}


def _row(cls: type, raw: Any) -> Any:
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise TypeError(f"expected {cls.__name__} or a dict, got {type(raw).__name__}")
    values = dict(raw)
    if cls in (RouteStats, IstioStats) and isinstance(values.get("latency"), Mapping):
        lat = values["latency"]
        values["latency"] = LatencyHistogram(
            tuple(lat.get("bounds", DEFAULT_LATENCY_BUCKETS_S)), list(lat.get("counts", [])), lat.get("sum_s", 0.0)
        )
    return cls(**values)


def coerce_report(raw: StatsReport | Mapping[str, Any]) -> StatsReport:
    """Accept a StatsReport or the equivalent dict; raise TypeError/ValueError on anything else."""
    if isinstance(raw, StatsReport):
        return raw
    if not isinstance(raw, Mapping):
        raise TypeError(f"a stats provider returned {type(raw).__name__}, not a StatsReport or dict")
    unknown = set(raw) - set(_ROW_TYPES) - {"xds_connected"}
    if unknown:
        raise ValueError(f"unknown stats keys: {', '.join(sorted(unknown))}")
    report = StatsReport(xds_connected=raw.get("xds_connected"))
    for key, cls in _ROW_TYPES.items():
        setattr(report, key, [_row(cls, r) for r in raw.get(key, ())])
    return report


StatsProvider = Callable[[], "StatsReport | Mapping[str, Any]"]


class RouteCounters:
    """Hot-path helper for the proxy: plain ints, snapshot() copies them into a RouteStats."""

    __slots__ = ("cluster", "latency", "listener", "plane", "request_bytes", "requests", "response_bytes",
                 "responses", "route")  # fmt: skip

    def __init__(self, plane: str, listener: str, route: str, cluster: str) -> None:
        self.plane, self.listener, self.route, self.cluster = plane, listener, route, cluster
        self.requests = 0
        self.responses = [0] * 5
        self.request_bytes = 0
        self.response_bytes = 0
        self.latency = LatencyHistogram()

    def record(self, status: int, latency_s: float, request_bytes: int = 0, response_bytes: int = 0) -> None:
        self.requests += 1
        if 100 <= status <= 599:
            self.responses[status // 100 - 1] += 1
        self.request_bytes += request_bytes
        self.response_bytes += response_bytes
        self.latency.observe(latency_s)

    def snapshot(self) -> RouteStats:
        return RouteStats(
            self.plane, self.listener, self.route, self.cluster, self.requests,
            {cls: n for cls, n in zip(RESPONSE_CLASSES, self.responses, strict=True) if n},
            self.request_bytes, self.response_bytes,
            LatencyHistogram(self.latency.bounds, list(self.latency.counts), self.latency.sum_s),
        )  # fmt: skip


class StatsRegistry:
    """Named stats providers. Thread-safe registration; providers are called on the scraping thread."""

    def __init__(self) -> None:
        self._providers: dict[str, StatsProvider] = {}
        self._lock = threading.Lock()
        self.provider_errors: dict[str, int] = {}

    def register(self, name: str, provider: StatsProvider) -> None:
        with self._lock:
            self._providers[name] = provider

    def unregister(self, name: str) -> None:
        with self._lock:
            self._providers.pop(name, None)

    def gather(self) -> StatsReport:
        """Call every provider and merge their reports (rows with equal labels are summed)."""
        with self._lock:
            providers = list(self._providers.items())
        reports = []
        for name, provider in providers:
            try:
                reports.append(coerce_report(provider()))
            except Exception:
                log.exception("stats provider %r failed", name)
                self.provider_errors[name] = self.provider_errors.get(name, 0) + 1
        return merge_reports(reports)


def _sum_rows(rows: Iterable[Any], key_fields: tuple[str, ...]) -> list[Any]:
    merged: dict[tuple, Any] = {}
    for row in rows:
        key = tuple(getattr(row, f) for f in key_fields)
        if key not in merged:
            merged[key] = dataclasses.replace(row)
            for f in dataclasses.fields(row):  # copy containers so merging never mutates a provider's data
                value = getattr(row, f.name)
                if isinstance(value, dict):
                    setattr(merged[key], f.name, dict(value))
            continue
        acc = merged[key]
        for f in dataclasses.fields(row):
            if f.name in key_fields:
                continue
            mine, theirs = getattr(acc, f.name), getattr(row, f.name)
            if isinstance(mine, bool | str):
                setattr(acc, f.name, theirs or mine)  # versions: the last report wins
            elif isinstance(mine, int | float):
                setattr(acc, f.name, mine + theirs)
            elif isinstance(mine, dict):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0) + v
            elif isinstance(mine, LatencyHistogram):
                setattr(acc, f.name, mine.merged(theirs))
    return list(merged.values())


def merge_reports(reports: Sequence[StatsReport]) -> StatsReport:
    connected = [r.xds_connected for r in reports if r.xds_connected is not None]
    return StatsReport(
        routes=_sum_rows((r for rep in reports for r in rep.routes), ("plane", "listener", "route", "cluster")),
        listeners=_sum_rows((r for rep in reports for r in rep.listeners), ("plane", "listener")),
        clusters=_sum_rows((r for rep in reports for r in rep.clusters), ("plane", "cluster")),
        datapath=_sum_rows((r for rep in reports for r in rep.datapath), ("plane",)),
        xds=_sum_rows((r for rep in reports for r in rep.xds), ("type_url",)),
        xds_connected=any(connected) if connected else None,
        sniff=_sum_rows((r for rep in reports for r in rep.sniff), ("plane",)),
        sni_routes=_sum_rows((r for rep in reports for r in rep.sni_routes), ("plane", "chain", "sni")),
        plane_groups=[r for rep in reports for r in rep.plane_groups],  # one provider: nothing to sum
        overload=_sum_rows((r for rep in reports for r in rep.overload), ("plane",)),
        tls=_sum_rows((r for rep in reports for r in rep.tls), ("plane",)),
        certificates=[r for rep in reports for r in rep.certificates],  # one provider: the xDS client
        istio=_sum_rows(
            (r for rep in reports for r in rep.istio), ("plane", "cluster", "source_principal", "destination_principal")
        ),
        node_shed=[r for rep in reports for r in rep.node_shed],  # one provider: nothing to sum
        hbone=_sum_rows((r for rep in reports for r in rep.hbone), PEER_KEY),
        hbone_node=[r for rep in reports for r in rep.hbone_node],  # one provider
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
    routed = CounterMetricFamily(
        "planemesh_sni_routed_connections",
        "Passthrough connections per filter chain and SNI",
        labels=["plane", "chain", "sni"],
    )
    for r in report.sni_routes:
        routed.add_metric([r.plane, r.chain, r.sni], r.connections)
    yield from (verdicts, inner, sni, alpn, silent, active, total, nbytes, failures, no_upstream, routed)


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
