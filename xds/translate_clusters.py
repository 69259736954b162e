"""Cluster (CDS) + ClusterLoadAssignment (EDS or load_assignment) -> planemesh Cluster."""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from planemesh.model.config import (
    CircuitBreakers,
    Cluster,
    ClusterKind,
    ConfigError,
    Endpoint,
    LbPolicy,
    OutlierDetection,
)
from planemesh.model.planes import Plane
from planemesh.xds.client_state import eds_name
from planemesh.xds.istio_ext import istio_extension
from planemesh.xds.translate_common import (
    note_ignored,
    only,
    opt_seconds,
    planemesh_metadata,
    seconds,
    socket_address,
    type_name,
    uint,
)
from planemesh.xds.translate_dns import DNS_FIELDS, DNS_KINDS, dns_address, dns_settings
from planemesh.xds.translate_internal import unwrap_internal_upstream
from planemesh.xds.translate_tls import socket_tls, tls_labels, with_socket_matches

C = cluster_pb2.Cluster
_KINDS = {C.STATIC: ClusterKind.STATIC, C.EDS: ClusterKind.EDS, C.ORIGINAL_DST: ClusterKind.ORIGINAL_DST}
_KINDS.update(DNS_KINDS)  # xds/translate_dns.py
_LB = {
    C.ROUND_ROBIN: LbPolicy.ROUND_ROBIN,
    C.LEAST_REQUEST: LbPolicy.LEAST_REQUEST,
    C.RANDOM: LbPolicy.RANDOM,
    C.RING_HASH: LbPolicy.RING_HASH,
    C.MAGLEV: LbPolicy.MAGLEV,
}
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Dropped on purpose: names, stats and settings that only matter to DNS or other cluster types.
_HARMLESS = {
    "name",
    "alt_stat_name",
    "metadata",
    "cleanup_interval",
    "per_connection_buffer_limit_bytes",
    "track_cluster_stats",
}
_SUPPORTED = {
    "type",
    "eds_cluster_config",
    "connect_timeout",
    "lb_policy",
    "common_lb_config",
    "load_assignment",
    "circuit_breakers",
    "outlier_detection",
    "http2_protocol_options",
    "typed_extension_protocol_options",
    "transport_socket",  # TLS origination: xds/translate_tls.py
    "transport_socket_matches",  # Istio's auto-mTLS: xds/translate_tls.py
    "filters",  # checked by _upstream_filters
} | DNS_FIELDS  # checked by dns_settings (a cluster of another type ignores them, as Envoy does)
# Accepted without effect (docs/istio-conformance.md): field -> why dropping it is safe.
_IGNORED = {
    "upstream_bind_config": (
        "istiod binds inbound connections to 127.0.0.6 so the sidecar's own netfilter redirect does not capture "
        "them again; planemesh intercepts in eBPF and never captures its own upstream connections"
    ),
}
# EDS health statuses that receive traffic: UNKNOWN, HEALTHY, DEGRADED.
_HEALTHY = {0, 1, 5}
# common_lb_config fields accepted without effect: planemesh merges no updates, runs no active health checks
# and panics only when every endpoint is ejected (Istio sends healthy_panic_threshold 0 with outlier detection).
_COMMON_LB_HARMLESS = {"healthy_panic_threshold", "update_merge_window", "ignore_new_hosts_until_first_hc"}
# Policies that can pick a locality first; a consistent hash must see every endpoint of the level.
_LOCALITY_POLICIES = {LbPolicy.ROUND_ROBIN, LbPolicy.LEAST_REQUEST, LbPolicy.RANDOM}
ENVOY_OVERPROVISIONING = 140  # the factor planemesh applies to locality health (agent/proxy/lb.py)


def endpoints_of(cla, path: str, address_of=socket_address) -> tuple[Endpoint, ...]:
    """ClusterLoadAssignment -> endpoints with locality ("region/zone/sub_zone") and its weight, priority,
    weight, health. `address_of`: dns_address for a DNS cluster's hosts (names kept)."""
    only(cla, {"cluster_name", "endpoints", "policy"}, path)
    _cla_policy(cla, f"{path}.policy")
    out: list[Endpoint] = []
    seen: set[tuple[str, int]] = set()
    locality_weights: dict[tuple[int, str], int] = {}
    for li, lle in enumerate(cla.endpoints):
        lpath = f"{path}.endpoints[{li}]"
        only(lle, {"locality", "lb_endpoints", "load_balancing_weight", "priority", "metadata"}, lpath)
        loc = lle.locality
        locality = "/".join(x for x in (loc.region, loc.zone, loc.sub_zone) if x)
        locality_weight = uint(lle, "load_balancing_weight", 0)
        if lle.HasField("load_balancing_weight") and locality_weight < 1:
            raise ConfigError(f"{lpath}.load_balancing_weight", "must be >= 1")
        if locality_weights.setdefault((lle.priority, locality), locality_weight) != locality_weight:
            raise ConfigError(
                f"{lpath}.load_balancing_weight",
                f"locality {locality or '(none)'!r} at priority {lle.priority} is listed with another weight",
            )
        for ei, lbe in enumerate(lle.lb_endpoints):
            epath = f"{lpath}.lb_endpoints[{ei}]"
            only(lbe, {"endpoint", "health_status", "load_balancing_weight", "metadata", "endpoint_name"}, epath)
            only(lbe.endpoint, {"address", "hostname", "health_check_config"}, f"{epath}.endpoint")
            ip, port = address_of(lbe.endpoint.address, f"{epath}.endpoint.address")
            if (ip, port) in seen:
                raise ConfigError(epath, f"endpoint {ip} port {port} is listed twice")
            seen.add((ip, port))
            weight = uint(lbe, "load_balancing_weight", 1)
            if weight < 1:
                raise ConfigError(f"{epath}.load_balancing_weight", "must be >= 1")
            out.append(
                Endpoint(
                    address=ip,
                    port=port,
                    weight=weight,
                    priority=lle.priority,
                    locality=locality,
                    healthy=lbe.health_status in _HEALTHY,
                    locality_weight=locality_weight,
                    tls_labels=tls_labels(lbe.metadata),  # xds/translate_tls.py
                )
            )
    return tuple(out)


def _cla_policy(cla, path: str) -> None:
    if not cla.HasField("policy"):
        return
    only(cla.policy, {"overprovisioning_factor"}, path)
    factor = uint(cla.policy, "overprovisioning_factor", ENVOY_OVERPROVISIONING)
    if factor != ENVOY_OVERPROVISIONING:
        raise ConfigError(
            f"{path}.overprovisioning_factor", f"only Envoy's default {ENVOY_OVERPROVISIONING} is supported"
        )


def _locality_weighted(cluster, lb: LbPolicy, path: str) -> bool:
    """common_lb_config: True with locality_weighted_lb_config; anything that would change balancing otherwise
    (zone aware routing, hashing options, host status overrides) is refused."""
    if not cluster.HasField("common_lb_config"):
        return False
    common = cluster.common_lb_config
    only(common, _COMMON_LB_HARMLESS | {"locality_weighted_lb_config"}, path)
    if not common.HasField("locality_weighted_lb_config"):
        return False
    if lb not in _LOCALITY_POLICIES:
        raise ConfigError(
            f"{path}.locality_weighted_lb_config",
            f"locality weights go with ROUND_ROBIN, LEAST_REQUEST or RANDOM, not {lb.name}",
        )
    return True


def _http2(cluster, path: str) -> tuple[bool, bool]:
    """(h2c upstream, upstream protocol as the downstream's: use_downstream_protocol_config)."""
    http2 = cluster.HasField("http2_protocol_options")
    downstream = False
    for key, packed in cluster.typed_extension_protocol_options.items():
        kpath = f"{path}.typed_extension_protocol_options[{key}]"
        if type_name(packed.type_url) != HTTP_OPTIONS:
            raise ConfigError(kpath, f"protocol options {type_name(packed.type_url)!r} are not supported")
        opts = http_protocol_options_pb2.HttpProtocolOptions()
        packed.Unpack(opts)
        only(opts, {"explicit_http_config", "common_http_protocol_options", "use_downstream_protocol_config"}, kpath)
        downstream = downstream or opts.HasField("use_downstream_protocol_config")
        explicit = opts.explicit_http_config
        if explicit.HasField("http3_protocol_options"):
            raise ConfigError(kpath, "HTTP/3 upstreams are not supported")
        http2 = http2 or explicit.HasField("http2_protocol_options")
    return http2, downstream


def _circuit_breakers(cluster, path: str) -> CircuitBreakers:
    cb = CircuitBreakers()
    for i, th in enumerate(cluster.circuit_breakers.thresholds):
        tpath = f"{path}.circuit_breakers.thresholds[{i}]"
        only(
            th,
            {"priority", "max_connections", "max_pending_requests", "max_requests", "max_retries", "track_remaining"},
            tpath,
        )
        if th.priority != 0:
            continue  # HIGH routing priority: planemesh has one priority per plane, DEFAULT applies
        cb = CircuitBreakers(
            max_connections=uint(th, "max_connections", cb.max_connections),
            max_pending_requests=uint(th, "max_pending_requests", cb.max_pending_requests),
            max_requests=uint(th, "max_requests", cb.max_requests),
            max_retries=uint(th, "max_retries", cb.max_retries),
        )
    return cb


def _outlier(cluster, path: str) -> OutlierDetection | None:
    if not cluster.HasField("outlier_detection"):
        return None
    od = cluster.outlier_detection
    only(
        od,
        {
            "consecutive_5xx",
            "consecutive_gateway_failure",
            "interval",
            "base_ejection_time",
            "max_ejection_percent",
            "enforcing_consecutive_5xx",
            "enforcing_consecutive_gateway_failure",
            "enforcing_success_rate",
        },
        f"{path}.outlier_detection",
    )
    if od.HasField("enforcing_success_rate") and od.enforcing_success_rate.value != 0:
        raise ConfigError(f"{path}.outlier_detection.enforcing_success_rate", "success-rate ejection is not supported")
    d = OutlierDetection()
    return OutlierDetection(
        consecutive_5xx=uint(od, "consecutive_5xx", d.consecutive_5xx),
        consecutive_gateway_failure=uint(od, "consecutive_gateway_failure", d.consecutive_gateway_failure),
        interval_s=opt_seconds(od, "interval") or d.interval_s,
        base_ejection_time_s=opt_seconds(od, "base_ejection_time") or d.base_ejection_time_s,
        max_ejection_percent=min(100, uint(od, "max_ejection_percent", d.max_ejection_percent)),
    )


def _upstream_filters(cluster, path: str) -> None:
    for i, flt in enumerate(cluster.filters):
        fpath = f"{path}.filters[{i}]"
        why = istio_extension(flt.name, flt.typed_config)
        if why is None:
            raise ConfigError(fpath, f"upstream network filter {flt.name!r} is not supported")
        note_ignored(fpath, why)


def translate_cluster(cluster, endpoints: Mapping[str, object], planes: tuple[Plane, ...], path: str) -> Cluster:
    cluster = unwrap_internal_upstream(cluster, path)  # xds/translate_internal.py
    only(cluster, _HARMLESS | _SUPPORTED, path, _IGNORED)
    _upstream_filters(cluster, path)
    if cluster.WhichOneof("cluster_discovery_type") != "type" and cluster.HasField("cluster_type"):
        raise ConfigError(f"{path}.cluster_type", "custom cluster types are not supported")
    kind = _KINDS.get(cluster.type)
    if kind is None:
        raise ConfigError(
            f"{path}.type",
            f"{C.DiscoveryType.Name(cluster.type)} clusters are not supported (STATIC, EDS, ORIGINAL_DST, "
            "STRICT_DNS, LOGICAL_DNS)",
        )
    if (cluster.lb_policy == C.CLUSTER_PROVIDED) != (kind is ClusterKind.ORIGINAL_DST):
        raise ConfigError(f"{path}.lb_policy", "CLUSTER_PROVIDED goes with ORIGINAL_DST clusters, and only with them")
    lb = _LB.get(cluster.lb_policy, LbPolicy.ROUND_ROBIN if kind is ClusterKind.ORIGINAL_DST else None)
    if lb is None:
        raise ConfigError(f"{path}.lb_policy", f"{C.LbPolicy.Name(cluster.lb_policy)} is not supported")
    eps: tuple[Endpoint, ...] = ()
    dns = None
    if kind in DNS_KINDS.values():  # the hosts resolve in the workers (agent/proxy/dns.py)
        hosts = endpoints_of(cluster.load_assignment, f"{path}.load_assignment", dns_address)
        dns = dns_settings(cluster, kind, hosts, path)
    elif kind is ClusterKind.STATIC:
        # No endpoints is valid (Istio's BlackHoleCluster): every request answers 503 UH, as in Envoy.
        eps = endpoints_of(cluster.load_assignment, f"{path}.load_assignment")
    elif kind is ClusterKind.EDS:
        service = eds_name(cluster) or cluster.name
        cla = endpoints.get(service)
        if cla is None:
            raise ConfigError(
                f"{path}.eds_cluster_config", f"no endpoints (ClusterLoadAssignment {service!r}) received"
            )
        eps = endpoints_of(cla, f"endpoints[{service}]")
    elif cluster.HasField("load_assignment"):
        raise ConfigError(f"{path}.load_assignment", "an ORIGINAL_DST cluster takes no endpoints")
    plane = planemesh_metadata(cluster.metadata).get("plane")
    if plane is not None and plane not in {p.name for p in planes}:
        raise ConfigError(f"{path}.metadata.planemesh.plane", f"unknown plane {plane!r}")
    http2, downstream = _http2(cluster, path)
    timeout = opt_seconds(cluster, "connect_timeout")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"{path}.connect_timeout", "must be > 0")
    base = Cluster(
        name=cluster.name,
        kind=kind,
        endpoints=eps,
        lb_policy=lb,
        connect_timeout_s=timeout,
        circuit_breakers=_circuit_breakers(cluster, path),
        outlier=_outlier(cluster, path),
        http2=http2,
        downstream_protocol=downstream,
        plane=plane,
        locality_weighted=_locality_weighted(cluster, lb, f"{path}.common_lb_config"),
        tls=socket_tls(cluster, path, upstream=True),
        dns=dns,
    )
    return with_socket_matches(cluster, path, base)  # transport_socket_matches (xds/translate_tls.py)


__all__ = ["endpoints_of", "seconds", "translate_cluster"]
