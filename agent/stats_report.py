"""Stats reports: plain counters on the hot path, rows merged at scrape time (agent/metrics.py renders them).

Components register *providers*: zero-argument callables returning a `StatsReport` (or a dict with the
same keys, each a list of dicts with the fields of the matching dataclass below). The collector calls every
provider at scrape time (StatsRegistry.gather) and sums rows with equal labels (several proxy workers may report
the same listener); agent/metrics.py's collector yields the Prometheus families. A provider that raises is logged
and counted; the scrape still succeeds.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from planemesh.agent.hbone.metrics import PEER_KEY, HboneNodeStats, HbonePeerStats

log = logging.getLogger("planemesh.agent.metrics")  # the name it had before the split

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
    # TLS originated on relayed TCP (agent/proxy/tcp_originate.py): handshakes, failed, san_refused, timeouts
    upstream_tls: dict[str, int] = field(default_factory=dict)


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


ROW_TYPES = {
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
    unknown = set(raw) - set(ROW_TYPES) - {"xds_connected"}
    if unknown:
        raise ValueError(f"unknown stats keys: {', '.join(sorted(unknown))}")
    report = StatsReport(xds_connected=raw.get("xds_connected"))
    for key, cls in ROW_TYPES.items():
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
