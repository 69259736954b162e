"""planemesh's configuration model: one immutable Snapshot, whatever produced it.

Sources (the static YAML loader in model/static_config.py, the xDS translation in planemesh.xds)
build a Snapshot; consumers (BPF policy, proxy workers, plane SLA) read it. Nothing here does I/O.
"""

from __future__ import annotations

import copyreg
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from planemesh.model.ip import IPNetwork
from planemesh.model.planes import SLA, Plane
from planemesh.model.tls_config import Secret, TlsContext, TlsMatch


class ConfigError(ValueError):
    """A configuration is invalid. `path` names the offending field, e.g. `planes[1].cidrs[0]`."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


class ListenerProtocol(StrEnum):
    HTTP = "http"  # proxied through the plane's L7 listener
    TCP = "tcp"  # plain L4: bypassed in the kernel


class TrafficDirection(StrEnum):
    """Envoy's Listener.traffic_direction: istiod sets OUTBOUND on virtualOutbound and its per-destination
    listeners, INBOUND on virtualInbound. A plane's SLA mTLS mode governs the chains of listeners that are not
    OUTBOUND (Istio's PeerAuthentication is about inbound traffic; agent/proxy/tls.py, ebpf/policy.py)."""

    UNSPECIFIED = ""  # static configuration, or xDS without the field: treated like inbound
    INBOUND = "inbound"
    OUTBOUND = "outbound"


# ---- routes (RDS) ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # lower-case
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    present: bool | None = None
    invert: bool = False


@dataclass(frozen=True, slots=True)
class QueryMatch:
    name: str
    exact: str | None = None
    regex: str | None = None
    present: bool | None = None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    prefix: str | None = "/"
    path: str | None = None
    regex: str | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()
    connect: bool = False  # Envoy's connect_matcher: matches CONNECT requests, and only they match it


@dataclass(frozen=True, slots=True)
class UpgradeConfig:
    """An HTTP upgrade a listener or a route allows or refuses (Envoy upgrade_configs). `upgrade_type` is
    lower-case: "websocket" or any other Upgrade token, "connect" for CONNECT tunnels."""

    upgrade_type: str
    enabled: bool = True


# A listener that says nothing about upgrades (static configs, undeclared ports) allows WebSocket, as Istio
# configures it, and not CONNECT. xDS listeners get exactly their HCM upgrade_configs (Envoy: none).
DEFAULT_UPGRADES = (UpgradeConfig("websocket"),)
# A listener that says nothing about tracing (static configs, undeclared ports) adds this hop's trace context to
# every request, every new trace sampled. xDS listeners get their HCM's `tracing` (Envoy: none, no context).
DEFAULT_TRACE = 100.0


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    name: str
    weight: int


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_on: frozenset[str] = frozenset()  # 5xx, gateway-error, connect-failure, reset, retriable-status-codes
    num_retries: int = 1
    per_try_timeout_s: float | None = None
    retriable_status_codes: frozenset[int] = frozenset()
    backoff_base_s: float = 0.025
    backoff_max_s: float = 0.25


@dataclass(frozen=True, slots=True)
class HashPolicy:
    header: str | None = None  # lower-case header name
    source_ip: bool = False


@dataclass(frozen=True, slots=True)
class Mirror:
    cluster: str
    fraction: float = 1.0  # 0..1


@dataclass(frozen=True, slots=True)
class RouteAction:
    cluster: str | None = None  # None with no weighted clusters: the original destination
    weighted: tuple[WeightedCluster, ...] = ()
    timeout_s: float | None = None  # None: the plane's SLA request timeout
    idle_timeout_s: float | None = None
    retry: RetryPolicy | None = None
    prefix_rewrite: str | None = None
    host_rewrite: str | None = None
    hash_policy: tuple[HashPolicy, ...] = ()
    mirrors: tuple[Mirror, ...] = ()
    upgrades: tuple[UpgradeConfig, ...] = ()  # per-route overrides of the listener's upgrades


@dataclass(frozen=True, slots=True)
class Redirect:
    host: str | None = None
    path: str | None = None
    scheme: str | None = None
    code: int = 301


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class HeaderValue:
    name: str
    value: str
    append: bool = True


@dataclass(frozen=True, slots=True)
class Route:
    match: RouteMatch = field(default_factory=RouteMatch)
    action: RouteAction | None = field(default_factory=RouteAction)
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    name: str = ""
    request_headers_to_add: tuple[HeaderValue, ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()
    response_headers_to_add: tuple[HeaderValue, ...] = ()
    response_headers_to_remove: tuple[str, ...] = ()
    rate_limit: LocalRateLimit | None = None  # per-route local rate limit (typed_per_filter_config)
    fault: FaultFilter | None = None  # per-route fault injection (typed_per_filter_config; Istio's VirtualService)


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...] = ("*",)
    routes: tuple[Route, ...] = (Route(),)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    virtual_hosts: tuple[VirtualHost, ...] = ()


# The route every HTTP listener without a route config uses: forward to the original destination.
ORIGINAL_DESTINATION_ROUTES = RouteConfig(
    name="planemesh.original_destination", virtual_hosts=(VirtualHost(name="any"),)
)

# ---- clusters (CDS/EDS) --------------------------------------------------------------------------


class ClusterKind(StrEnum):
    ORIGINAL_DST = "original_dst"
    STATIC = "static"
    EDS = "eds"
    STRICT_DNS = "strict_dns"  # every address of every host name (agent/proxy/dns.py resolves them)
    LOGICAL_DNS = "logical_dns"  # the first address of the one host name


class LbPolicy(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"
    RANDOM = "random"
    RING_HASH = "ring_hash"
    MAGLEV = "maglev"


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    weight: int = 1
    priority: int = 0
    locality: str = ""
    healthy: bool = True
    locality_weight: int = 0  # EDS LocalityLbEndpoints.load_balancing_weight (0: unset); see Cluster.locality_weighted
    tls_labels: tuple[tuple[str, str], ...] = ()  # metadata envoy.transport_socket_match (Istio: tlsMode)
    tls_socket: int = -1  # index into its cluster's tls_matches; -1: the cluster's tls (model/tls_config.py)


@dataclass(frozen=True, slots=True)
class DnsSettings:
    """How a STRICT_DNS / LOGICAL_DNS cluster resolves its hosts (Envoy's Cluster dns_* fields).

    `hosts` are endpoints whose address is a host name (or an IP literal, used as is); each resolved address
    becomes an endpoint with that host's port, weight, priority, locality and labels."""

    hosts: tuple[Endpoint, ...]
    refresh_s: float = 5.0  # dns_refresh_rate (Envoy's default 5 s)
    failure_refresh_s: float | None = None  # dns_failure_refresh_rate base; None: refresh_s
    respect_ttl: bool = False  # respect_dns_ttl: needs the record's TTL, which the system resolver hides
    family: str = "auto"  # dns_lookup_family: auto (v6 then v4), v4, v6, v4_preferred, all


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    interval_s: float = 10.0
    base_ejection_time_s: float = 30.0
    max_ejection_percent: int = 10


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    kind: ClusterKind = ClusterKind.ORIGINAL_DST
    endpoints: tuple[Endpoint, ...] = ()
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    connect_timeout_s: float | None = None  # None: the plane's SLA connect timeout
    circuit_breakers: CircuitBreakers = field(default_factory=CircuitBreakers)
    outlier: OutlierDetection | None = None
    http2: bool = False  # speak h2c upstream
    # use_downstream_protocol_config: HTTP/2 clients get h2c upstream, HTTP/1 clients HTTP/1.1 (http2 wins)
    downstream_protocol: bool = False
    plane: str | None = None  # None: the plane of each endpoint's address
    locality_weighted: bool = False  # common_lb_config.locality_weighted_lb_config: pick a locality first
    tls: TlsContext | None = None  # TLS origination (UpstreamTlsContext; model/tls_config.py)
    tls_matches: tuple[TlsMatch, ...] = ()  # transport_socket_matches with labels, in order
    dns: DnsSettings | None = None  # STRICT_DNS / LOGICAL_DNS only: endpoints come from resolving these hosts


# ---- HTTP filters ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaultFilter:
    delay_s: float | None = None
    delay_percent: float = 0.0
    abort_status: int | None = None
    abort_percent: float = 0.0
    header_controlled: bool = False  # x-envoy-fault-* request headers


@dataclass(frozen=True, slots=True)
class LocalRateLimit:
    max_tokens: int
    tokens_per_fill: int
    fill_interval_s: float


HttpFilter = FaultFilter | LocalRateLimit

# ---- listeners and the snapshot -----------------------------------------------------------------


# x-forwarded-client-cert (agent/proxy/xfcc.py): HCM forward_client_cert_details modes, and the
# set_current_client_cert_details fields planemesh fills.
XFCC_MODES = ("sanitize", "forward_only", "append_forward", "sanitize_set")
XFCC_DETAILS = ("subject", "uri", "dns")


@dataclass(frozen=True, slots=True)
class Listener:
    """A declared port on a plane: HTTP is proxied, TCP is bypassed in the kernel."""

    name: str
    plane: str
    port: int
    protocol: ListenerProtocol
    prefixes: tuple[IPNetwork, ...] = ()  # destination prefixes; empty: any destination of the plane
    route_config: str | None = None  # None: ORIGINAL_DESTINATION_ROUTES
    http_filters: tuple[HttpFilter, ...] = ()
    server_names: tuple[str, ...] = ()  # TLS SNI match for passthrough routing: exact names and `*.suffix`
    # tcp_proxy chains: the cluster(s) passthrough connections of this chain go to; empty: the original destination
    tcp_clusters: tuple[WeightedCluster, ...] = ()
    upgrades: tuple[UpgradeConfig, ...] = DEFAULT_UPGRADES  # HTTP upgrades and CONNECT allowed here
    # HTTP listeners only: peek first (Envoy's http_inspector + a tcp_proxy fallback chain, Istio's protocol
    # detection): HTTP is proxied with this listener's routes, anything else passes through untouched.
    sniff: bool = False
    tls: TlsContext | None = None  # TLS termination (DownstreamTlsContext; model/tls_config.py)
    transport_protocol: str = ""  # filter_chain_match: "tls" / "raw_buffer" (permissive ports); "" any
    # x-forwarded-client-cert (agent/proxy/xfcc.py): HCM forward_client_cert_details (Envoy's default: sanitize)
    forward_client_cert: str = "sanitize"
    client_cert_details: tuple[str, ...] = ()  # set_current_client_cert_details: subject, uri, dns
    # tcp_proxy chains: envoy.filters.network.rbac, checked once per connection (agent/proxy/tcp_authz.py);
    # agent/rbac.py's RbacFilter (not imported: that module imports this one)
    network_rbac: tuple[object, ...] = ()
    # tcp_proxy chains: filter_chain_match.application_protocols, matched against the ClientHello's ALPN
    application_protocols: tuple[str, ...] = ()
    # Source prefixes (Envoy filter_chain_match.source_prefix_ranges): a local workload's outbound listeners carry
    # its addresses (agent/workloads/merge.py); empty: any source. HTTP listeners only so far. Last: callers
    # give the fields above by position.
    sources: tuple[IPNetwork, ...] = ()
    # tcp_proxy chains: istiod's default chain of the service this listener stands for (its VIP) to that service's
    # own cluster (xds/translate_tcp.py): the original destination is that cluster's choice, so the kernel may
    # bypass it (ebpf/policy.py keeps_destination)
    own_service: bool = False
    # The SPIFFE ID of the local workload this listener is scoped to (agent/workloads/merge.py: outbound, its
    # addresses in `sources`; inbound, in `prefixes`): the node's pod table, what a local server pod's inbound
    # stage sees as a same-node client's principal (agent/proxy/routing.py principal_of)
    workload_principal: str = ""
    # Envoy's traffic_direction of the listener this chain comes from (xds/translate.py): a plane's SLA mTLS mode
    # leaves OUTBOUND chains as xDS says (agent/proxy/tls.py, sniff_tls.py, ebpf/policy.py strict_planes)
    direction: TrafficDirection = TrafficDirection.UNSPECIFIED
    # HTTP listeners: this hop's trace context (agent/proxy/tracing.py), the percentage of new traces sampled;
    # None: no tracing, trace headers pass as they came (Envoy's HCM without `tracing`; xds/translate.py)
    trace_sampling: float | None = DEFAULT_TRACE


def _frozen(mapping: Mapping[str, object] | None) -> Mapping[str, object]:
    return MappingProxyType(dict(mapping or {}))


# Snapshots travel to per-plane worker processes pickled; a read-only mapping pickles as its contents.
def _readonly(contents: dict[str, object]) -> Mapping[str, object]:
    return MappingProxyType(contents)


copyreg.pickle(MappingProxyType, lambda m: (_readonly, (dict(m),)))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One complete, validated, immutable configuration. Consumers diff old against new."""

    version: str
    planes: tuple[Plane, ...]
    listeners: tuple[Listener, ...] = ()
    routes: Mapping[str, RouteConfig] = field(default_factory=lambda: _frozen(None))
    clusters: Mapping[str, Cluster] = field(default_factory=lambda: _frozen(None))
    secrets: Mapping[str, Secret] = field(default_factory=lambda: _frozen(None))  # by name (SDS or inline:...)

    def plane(self, name: str) -> Plane:
        for plane in self.planes:
            if plane.name == name:
                return plane
        raise KeyError(name)

    def plane_by_id(self, plane_id: int) -> Plane | None:
        for plane in self.planes:
            if plane.plane_id == plane_id:
                return plane
        return None

    def listeners_of(self, plane: str) -> tuple[Listener, ...]:
        return tuple(lsn for lsn in self.listeners if lsn.plane == plane)

    def route_config(self, name: str | None) -> RouteConfig:
        return ORIGINAL_DESTINATION_ROUTES if name is None else self.routes[name]  # type: ignore[return-value]


__all__ = [
    "SLA",
    "ConfigError",
    "Listener",
    "ListenerProtocol",
    "Plane",
    "Snapshot",
    "TrafficDirection",
]
