"""xDS resources + this node's planes -> one validated planemesh Snapshot (pure; see docs/xds.md).

A listener's plane: `metadata.filter_metadata.planemesh.plane`, else the plane whose CIDRs hold its bind
address, else (0.0.0.0 / ::) every plane. Each filter chain becomes one planemesh Listener per plane:
`http_connection_manager` -> HTTP (proxied), `tcp_proxy` -> TCP (bypassed in the kernel). Every error of
the whole update is collected into one ConfigError (one NACK naming every bad resource).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf.message import DecodeError
from netaddr import IPNetwork

from planemesh.agent.config import (
    Cluster,
    ConfigError,
    FaultFilter,
    HttpFilter,
    Listener,
    ListenerProtocol,
    RouteConfig,
    Snapshot,
    UpgradeConfig,
    WeightedCluster,
)
from planemesh.agent.proxy.sni_routing import server_name_error
from planemesh.agent.proxy.xfcc import DETAILS as XFCC_DETAILS
from planemesh.agent.proxy.xfcc import MODES as XFCC_MODES
from planemesh.agent.tls_config import Secret, any_tls
from planemesh.agent.validation import check_cpus_field, validate_snapshot
from planemesh.netplanes.model import SLA, Plane, plane_of_address
from planemesh.xds.client_state import XdsResources, eds_name
from planemesh.xds.translate_clusters import translate_cluster
from planemesh.xds.translate_common import (
    Errors,
    fraction,
    only,
    opt_seconds,
    parse_ip,
    planemesh_metadata,
    seconds,
    socket_address,
    type_name,
)
from planemesh.xds.translate_filters import LOCAL_RATELIMIT, local_ratelimit
from planemesh.xds.translate_rbac import RBAC, translate_rbac
from planemesh.xds.translate_routes import translate_route_config, translate_upgrades
from planemesh.xds.translate_tls import resolve_secrets, secret_uses, socket_tls

_EXT = "envoy.extensions."
HCM = _EXT + "filters.network.http_connection_manager.v3.HttpConnectionManager"
TCP_PROXY = _EXT + "filters.network.tcp_proxy.v3.TcpProxy"
ROUTER = _EXT + "filters.http.router.v3.Router"
FAULT = _EXT + "filters.http.fault.v3.HTTPFault"
LISTENER_FILTERS = {
    _EXT + "filters.listener.original_dst.v3.OriginalDst",
    _EXT + "filters.listener.http_inspector.v3.HttpInspector",
    _EXT + "filters.listener.tls_inspector.v3.TlsInspector",
}
_LISTENER_HARMLESS = {
    "name",
    "stat_prefix",
    "metadata",
    "transparent",
    "freebind",
    "traffic_direction",
    "access_log",
    "per_connection_buffer_limit_bytes",
    "listener_filters_timeout",
    "reuse_port",
    "enable_reuse_port",
    "continue_on_listener_filters_timeout",
    "tcp_backlog_size",
    "bind_to_port",
}
_HCM_SUPPORTED = {
    "codec_type",
    "stat_prefix",
    "rds",
    "route_config",
    "http_filters",
    "request_timeout",
    "common_http_protocol_options",
    "access_log",
    "use_remote_address",
    "generate_request_id",
    "server_name",
    "stream_idle_timeout",
    "normalize_path",
    "merge_slashes",
    "xff_num_trusted_hops",
    "upgrade_configs",
    "tracing",
    "http_protocol_options",
    "http2_protocol_options",
    "forward_client_cert_details",
    "set_current_client_cert_details",
}
# SLA fields a control plane may set through listener metadata planemesh.sla (numbers, booleans, cpus string).
_SLA_FIELDS = {f.name: f for f in dataclasses.fields(SLA) if f.name != "retry_on"}


@dataclasses.dataclass(slots=True)
class _Acc:
    """What the listeners produce besides Listener objects: inline routes and plane SLA overrides."""

    routes: dict[str, RouteConfig]
    sla: dict[str, dict[str, object]]  # plane -> field -> value
    sla_origin: dict[tuple[str, str], str]  # (plane, field) -> listener that set it
    tcp_clusters: list[tuple[str, str]]  # (path, cluster) for tcp_proxy cluster references
    secrets_used: dict[str, tuple[str, type]] = dataclasses.field(default_factory=dict)  # xds/translate_tls.py
    secrets_inline: dict[str, Secret] = dataclasses.field(default_factory=dict)


def _planes_of(listener, planes: tuple[Plane, ...], ip: str, path: str) -> list[Plane]:
    meta = planemesh_metadata(listener.metadata).get("plane")
    if meta is not None:
        for plane in planes:
            if plane.name == meta:
                return [plane]
        raise ConfigError(
            f"{path}.metadata.planemesh.plane", f"unknown plane {meta!r} (known: {', '.join(p.name for p in planes)})"
        )
    if ip in ("0.0.0.0", "::"):
        return list(planes)
    plane = plane_of_address(planes, ip)
    if plane is None:
        raise ConfigError(f"{path}.address", f"{ip} belongs to no plane of this node; set metadata planemesh.plane")
    return [plane]


def _set_sla(acc: _Acc, planes: list[Plane], key: str, value: object, listener: str, path: str) -> None:
    for plane in planes:
        prev = acc.sla.setdefault(plane.name, {}).get(key)
        if prev is not None and prev != value:
            other = acc.sla_origin[(plane.name, key)]
            raise ConfigError(path, f"plane {plane.name!r} {key} is {value} here but {prev} in listener {other!r}")
        acc.sla[plane.name][key] = value
        acc.sla_origin[(plane.name, key)] = listener


def _http_filters(hcm, path: str) -> tuple[HttpFilter, ...]:
    out: list[HttpFilter] = []
    filters = list(hcm.http_filters)
    for i, hf in enumerate(filters):
        fpath = f"{path}.http_filters[{i}]"
        kind = type_name(hf.typed_config.type_url)
        if hf.HasField("config_discovery"):
            raise ConfigError(fpath, "filter config discovery (ECDS) is not supported")
        if kind == ROUTER:
            if i != len(filters) - 1:
                raise ConfigError(fpath, "the router filter must be the last HTTP filter")
        elif hf.disabled:
            continue  # disabled by default and enabled per route: planemesh has no per-route filter config
        elif kind == FAULT:
            out.append(_fault(hf, fpath))
        elif kind == RBAC:
            rbac = translate_rbac(hf.typed_config, fpath)
            if rbac is not None:
                out.append(rbac)  # type: ignore[arg-type]
        elif kind == LOCAL_RATELIMIT:
            rl = local_ratelimit(hf.typed_config, fpath)
            if rl is not None:
                out.append(rl)
        elif hf.is_optional:
            continue
        else:
            raise ConfigError(fpath, f"HTTP filter {hf.name!r} ({kind or 'no typed_config'}) is not supported")
    if not filters or type_name(filters[-1].typed_config.type_url) != ROUTER:
        raise ConfigError(f"{path}.http_filters", "the last HTTP filter must be envoy.filters.http.router")
    return tuple(out)


def _xfcc(hcm, path: str) -> tuple[str, tuple[str, ...]]:
    """forward_client_cert_details / set_current_client_cert_details (agent/proxy/xfcc.py)."""
    mode = hcm_pb2.HttpConnectionManager.ForwardClientCertDetails.Name(hcm.forward_client_cert_details).lower()
    if mode not in XFCC_MODES:
        raise ConfigError(f"{path}.forward_client_cert_details", f"{mode.upper()} is not supported")
    details = hcm.set_current_client_cert_details
    only(details, XFCC_DETAILS, f"{path}.set_current_client_cert_details")
    subject = details.HasField("subject") and details.subject.value  # a BoolValue; uri and dns are bools
    return mode, tuple(d for d in XFCC_DETAILS if (subject if d == "subject" else getattr(details, d)))


def _fault(hf, path: str) -> FaultFilter:
    cfg = fault_pb2.HTTPFault()
    hf.typed_config.Unpack(cfg)
    only(cfg, {"delay", "abort"}, path)
    delay_s = delay_pct = abort_pct = 0.0
    abort_status = None
    header = False
    if cfg.HasField("delay"):
        only(cfg.delay, {"fixed_delay", "header_delay", "percentage"}, f"{path}.delay")
        delay_s = seconds(cfg.delay.fixed_delay)
        delay_pct = fraction(cfg.delay.percentage) * 100 if cfg.delay.HasField("percentage") else 100.0
        header = header or cfg.delay.HasField("header_delay")
    if cfg.HasField("abort"):
        only(cfg.abort, {"http_status", "header_abort", "percentage"}, f"{path}.abort")
        if cfg.abort.http_status and not 200 <= cfg.abort.http_status <= 599:
            raise ConfigError(f"{path}.abort.http_status", f"{cfg.abort.http_status} is not an HTTP status")
        abort_status = cfg.abort.http_status or None
        abort_pct = fraction(cfg.abort.percentage) * 100 if cfg.abort.HasField("percentage") else 100.0
        header = header or cfg.abort.HasField("header_abort")
    return FaultFilter(
        delay_s=delay_s or None,
        delay_percent=delay_pct if delay_s or header else 0.0,
        abort_status=abort_status,
        abort_percent=abort_pct if abort_status or header else 0.0,
        header_controlled=header,
    )


def _chain(listener, chain, ci: int, planes: list[Plane], port: int, acc: _Acc, path: str) -> list[Listener]:
    only(
        chain,
        {"filter_chain_match", "filters", "name", "metadata", "transport_socket_connect_timeout", "transport_socket"},
        path,
    )
    tls = socket_tls(chain, path, upstream=False)
    transport = chain.filter_chain_match.transport_protocol
    if transport not in ("", "tls", "raw_buffer"):
        raise ConfigError(f"{path}.filter_chain_match.transport_protocol", f"{transport!r}: expected tls or raw_buffer")
    m = chain.filter_chain_match
    only(
        m,
        {"destination_port", "prefix_ranges", "server_names", "transport_protocol", "application_protocols"},
        f"{path}.filter_chain_match",
    )
    if m.HasField("destination_port"):
        port = m.destination_port.value
        if not 1 <= port <= 65535:
            raise ConfigError(f"{path}.filter_chain_match.destination_port", f"{port} is not a TCP port")
    prefixes = []
    for i, rng in enumerate(m.prefix_ranges):
        ppath = f"{path}.filter_chain_match.prefix_ranges[{i}]"
        ip = parse_ip(rng.address_prefix, ppath)
        length = rng.prefix_len.value if rng.HasField("prefix_len") else (32 if ":" not in ip else 128)
        if length > (32 if ":" not in ip else 128):
            raise ConfigError(f"{ppath}.prefix_len", f"{length} is too long for {ip}")
        prefixes.append(IPNetwork(f"{ip}/{length}").cidr)
    for i, name in enumerate(m.server_names):
        if (why := server_name_error(name)) is not None:
            raise ConfigError(f"{path}.filter_chain_match.server_names[{i}]", why)
    if not chain.filters:
        raise ConfigError(
            f"{path}.filters", "a filter chain needs a terminal filter (http_connection_manager or tcp_proxy)"
        )
    for i, flt in enumerate(chain.filters[:-1]):
        raise ConfigError(
            f"{path}.filters[{i}]",
            f"network filter {flt.name!r} ({type_name(flt.typed_config.type_url)}) is not supported",
        )
    last = chain.filters[-1]
    fpath = f"{path}.filters[{len(chain.filters) - 1}]"
    kind = type_name(last.typed_config.type_url)
    route_config = None
    http_filters: tuple[HttpFilter, ...] = ()
    tcp_clusters: tuple[WeightedCluster, ...] = ()
    upgrades: tuple[UpgradeConfig, ...] = ()  # Envoy: an HCM without upgrade_configs refuses every upgrade
    xfcc: tuple[str, tuple[str, ...]] = ("sanitize", ())
    if kind == HCM:
        protocol = ListenerProtocol.HTTP
        hcm = hcm_pb2.HttpConnectionManager()
        last.typed_config.Unpack(hcm)
        only(hcm, _HCM_SUPPORTED, fpath)
        if hcm.HasField("rds"):
            route_config = hcm.rds.route_config_name
            if not route_config:
                raise ConfigError(f"{fpath}.rds.route_config_name", "empty")
        elif hcm.HasField("route_config"):
            rc = translate_route_config(hcm.route_config, f"{fpath}.route_config")
            route_config = rc.name or f"{listener.name}.inline.{chain.name or ci}"
            if route_config in acc.routes:
                raise ConfigError(
                    f"{fpath}.route_config.name", f"route configuration {route_config!r} is defined twice"
                )
            acc.routes[route_config] = RouteConfig(route_config, rc.virtual_hosts)
        else:
            raise ConfigError(fpath, "needs rds or an inline route_config (scoped routes are not supported)")
        http_filters = _http_filters(hcm, fpath)
        xfcc = _xfcc(hcm, fpath)
        upgrades = translate_upgrades(hcm.upgrade_configs, f"{fpath}.upgrade_configs", route_level=False)
        if (timeout := opt_seconds(hcm, "request_timeout")) is not None and timeout > 0:
            _set_sla(acc, planes, "request_timeout_s", timeout, listener.name, f"{fpath}.request_timeout")
        idle = opt_seconds(hcm.common_http_protocol_options, "idle_timeout")
        if idle is not None and idle > 0:
            _set_sla(acc, planes, "idle_timeout_s", idle, listener.name, f"{fpath}.common_http_protocol_options")
    elif kind == TCP_PROXY:
        protocol = ListenerProtocol.TCP
        tcp = tcp_proxy_pb2.TcpProxy()
        last.typed_config.Unpack(tcp)
        only(tcp, {"stat_prefix", "cluster", "weighted_clusters", "idle_timeout", "access_log"}, fpath)
        if tcp.cluster:
            tcp_clusters = (WeightedCluster(tcp.cluster, 1),)
        else:
            tcp_clusters = tuple(WeightedCluster(w.name, w.weight) for w in tcp.weighted_clusters.clusters)
        if not tcp_clusters:
            raise ConfigError(fpath, "tcp_proxy needs a cluster")
        acc.tcp_clusters += [(f"{fpath}.cluster", w.name) for w in tcp_clusters]
    else:
        raise ConfigError(fpath, f"network filter {last.name!r} ({kind or 'no typed_config'}) is not supported")
    if tls is not None:
        if protocol is not ListenerProtocol.HTTP:
            raise ConfigError(f"{path}.transport_socket", "TLS is terminated on http_connection_manager chains only")
        secret_uses(tls, f"{path}.transport_socket", acc.secrets_used, acc.secrets_inline)
    base = chain.name or (listener.name if ci == 0 else f"{listener.name}#{ci}")
    return [
        Listener(
            name=base if len(planes) == 1 else f"{base}@{plane.name}",
            plane=plane.name,
            port=port,
            protocol=protocol,
            prefixes=tuple(prefixes),
            route_config=route_config,
            http_filters=http_filters,
            server_names=tuple(n.lower() for n in m.server_names),
            tcp_clusters=tcp_clusters,
            upgrades=upgrades,
            tls=tls,
            transport_protocol=m.transport_protocol,
            forward_client_cert=xfcc[0],
            client_cert_details=xfcc[1],
        )
        for plane in planes
    ]


def translate_listener(listener, planes: tuple[Plane, ...], acc: _Acc, path: str) -> list[Listener]:
    only(listener, _LISTENER_HARMLESS | {"address", "filter_chains", "default_filter_chain", "listener_filters"}, path)
    ip, port = socket_address(listener.address, f"{path}.address")
    mine = _planes_of(listener, planes, ip, path)
    for i, lf in enumerate(listener.listener_filters):
        if type_name(lf.typed_config.type_url) not in LISTENER_FILTERS:
            raise ConfigError(f"{path}.listener_filters[{i}]", f"listener filter {lf.name!r} is not supported")
    meta_sla = planemesh_metadata(listener.metadata).get("sla") or {}
    if not isinstance(meta_sla, dict):
        raise ConfigError(f"{path}.metadata.planemesh.sla", "expected a struct")
    for key, value in meta_sla.items():
        fld = _SLA_FIELDS.get(key)
        if fld is None:
            raise ConfigError(
                f"{path}.metadata.planemesh.sla.{key}", f"unknown SLA field (known: {', '.join(_SLA_FIELDS)})"
            )
        if isinstance(fld.default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}.metadata.planemesh.sla.{key}", "expected true or false")
        elif fld.type == "str | None":  # cpus: a cpu list ("0-1,3") of the node's online CPUs
            if not isinstance(value, str):
                raise ConfigError(f"{path}.metadata.planemesh.sla.{key}", "expected a string such as 0-1,3")
            check_cpus_field(value, f"{path}.metadata.planemesh.sla.{key}")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{path}.metadata.planemesh.sla.{key}", "expected a non-negative number")
        elif fld.type in ("int", "int | None"):
            value = int(value)
        _set_sla(acc, mine, key, value, listener.name, f"{path}.metadata.planemesh.sla.{key}")
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    if not chains:
        raise ConfigError(f"{path}.filter_chains", "a listener needs at least one filter chain")
    out: list[Listener] = []
    for ci, chain in enumerate(chains):
        out += _chain(listener, chain, ci, mine, port, acc, f"{path}.filter_chains[{ci}]")
    return out


def _guarded(errors: Errors, path: str, fn, *args):
    """One resource's translation; a malformed nested message (an undecodable typed_config) is its error."""
    try:
        return fn(*args)
    except ConfigError as exc:
        errors.add(exc)
    except (DecodeError, ValueError, TypeError, KeyError) as exc:
        errors.add(ConfigError(path, f"malformed resource: {exc}"))
    return None


class TranslationCache:
    """Results of earlier translations, reused while a resource is the very same message object.

    The client state machine passes on the same message objects for every resource an update did not
    touch, so one changed ClusterLoadAssignment retranslates one cluster instead of all of them (1,000
    clusters x 10 endpoints: ~220 ms -> a few ms per change). Entries hold strong references to their
    inputs, so an identity check can never match a recycled id. Only successes are kept: a bad resource
    is translated (and refused) again on every update. Messages must not be mutated after delivery.
    """

    def __init__(self) -> None:
        self._clusters: dict[str, tuple[object, object, tuple[Plane, ...], Cluster]] = {}
        self._routes: dict[str, tuple[object, RouteConfig]] = {}
        self.hits = 0
        self.misses = 0

    def cluster(self, name: str, cluster, endpoints, planes: tuple[Plane, ...], path: str) -> Cluster:
        service = eds_name(cluster)
        cla = endpoints.get(service) if service is not None else None
        hit = self._clusters.get(name)
        if hit is not None and hit[0] is cluster and hit[1] is cla and (hit[2] is planes or hit[2] == planes):
            self.hits += 1
            return hit[3]
        self.misses += 1
        result = translate_cluster(cluster, endpoints, planes, path)
        self._clusters[name] = (cluster, cla, planes, result)
        return result

    def route(self, name: str, rc, path: str) -> RouteConfig:
        hit = self._routes.get(name)
        if hit is not None and hit[0] is rc:
            self.hits += 1
            return hit[1]
        self.misses += 1
        result = translate_route_config(rc, path)
        self._routes[name] = (rc, result)
        return result

    def retain(self, clusters: Mapping[str, object], routes: Mapping[str, object]) -> None:
        """Forget resources that are gone (the cache never outgrows the current set)."""
        if len(self._clusters) > len(clusters) or any(n not in clusters for n in self._clusters):
            self._clusters = {n: v for n, v in self._clusters.items() if n in clusters}
        if len(self._routes) > len(routes) or any(n not in routes for n in self._routes):
            self._routes = {n: v for n, v in self._routes.items() if n in routes}


def translate(
    resources: XdsResources, planes: tuple[Plane, ...], cache: TranslationCache | None = None
) -> Snapshot:
    """The complete update -> a validated Snapshot, or one ConfigError naming every bad resource.

    With `cache` (one per client), resources unchanged since the previous call are not translated again.
    """
    cache = cache or TranslationCache()
    errors = Errors()
    acc = _Acc(routes={}, sla={}, sla_origin={}, tcp_clusters=[])
    clusters = {}
    for name, cluster in sorted(resources.clusters.items()):
        path = f"cluster[{name}]"
        if (c := _guarded(errors, path, cache.cluster, name, cluster, resources.endpoints, planes, path)) is not None:
            clusters[name] = c
    listeners: list[Listener] = []
    for name, listener in sorted(resources.listeners.items()):
        path = f"listener[{name}]"
        listeners += _guarded(errors, path, translate_listener, listener, planes, acc, path) or []
    routes = dict(acc.routes)
    for name, rc in sorted(resources.routes.items()):
        path = f"route_config[{name}]"
        if name in routes:
            errors.add(ConfigError(path, "also defined inline in a listener"))
        elif (r := _guarded(errors, path, cache.route, name, rc, path)) is not None:
            routes[name] = r
    for path, cname in acc.tcp_clusters:
        if cname not in resources.clusters:
            errors.add(ConfigError(path, f"unknown cluster {cname!r}"))
    for name, c in sorted(clusters.items()):
        if any_tls(c) and c.http2:
            errors.add(ConfigError(f"cluster[{name}].transport_socket", "TLS origination speaks HTTP/1.1 upstream"))
        for tls in (c.tls, *(m.tls for m in c.tls_matches)):
            if tls is not None:
                secret_uses(tls, f"cluster[{name}].transport_socket", acc.secrets_used, acc.secrets_inline)
    secrets = resolve_secrets(acc.secrets_used, resources.secrets, acc.secrets_inline, errors)
    cache.retain(resources.clusters, resources.routes)
    errors.raise_if_any()
    new_planes = tuple(
        dataclasses.replace(p, sla=dataclasses.replace(p.sla, **acc.sla[p.name])) if p.name in acc.sla else p
        for p in planes
    )
    snap = Snapshot(
        version=f"xds:{resources.version}",
        planes=new_planes,
        listeners=tuple(listeners),
        routes=MappingProxyType(routes),
        clusters=MappingProxyType(clusters),
        secrets=MappingProxyType(secrets),
    )
    validate_snapshot(snap)
    return snap
