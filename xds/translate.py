"""xDS resources + this node's planes -> one validated planemesh Snapshot (pure; see docs/xds.md).

A listener's plane: `metadata.filter_metadata.planemesh.plane`, else the plane whose CIDRs hold its bind
address, else (0.0.0.0 / ::, or a service VIP of a listener that does not bind) every plane: the plane of a
connection is the interface it arrives on, never a listener's address. Each filter chain becomes one
planemesh Listener per plane: `http_connection_manager` -> HTTP (proxied), `tcp_proxy` -> TCP (bypassed in
the kernel where its cluster would pick the original destination anyway, else relayed by the proxy:
ebpf/policy.py, xds/translate_tcp.py), both on one destination -> HTTP sniffed. istiod's capture listeners
(virtualOutbound, virtualInbound) dispatch by original destination, which planemesh's interception does itself: their
per-port chains become listeners, their catch-alls are noted (docs/istio-conformance.md). Every error of
the whole update is collected into one ConfigError (one NACK naming every bad resource).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from types import MappingProxyType

from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf.message import DecodeError

from planemesh.model.config import (
    XFCC_DETAILS,
    XFCC_MODES,
    Cluster,
    ConfigError,
    HttpFilter,
    Listener,
    ListenerProtocol,
    RouteConfig,
    Snapshot,
    TrafficDirection,
    UpgradeConfig,
    WeightedCluster,
)
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import Plane, plane_of_address
from planemesh.model.server_names import server_name_error
from planemesh.model.tls_config import Secret, plane_tls
from planemesh.model.validation import validate_snapshot
from planemesh.xds.client_state import XdsResources, eds_name
from planemesh.xds.translate_capture import (
    TCP_PROXY,
    capture_chain_listeners,
    drop_shadowed_inbound,
    merge_same_destination,
)
from planemesh.xds.translate_clusters import translate_cluster
from planemesh.xds.translate_common import (
    Errors,
    note_ignored,
    only,
    opt_seconds,
    parse_ip,
    planemesh_metadata,
    socket_address,
    traffic_direction,
    type_name,
)
from planemesh.xds.translate_filters import http_filters, network_filter
from planemesh.xds.translate_http2 import http2_limits
from planemesh.xds.translate_internal import internal_listener
from planemesh.xds.translate_mtls import served_cluster, served_listeners
from planemesh.xds.translate_rbac import NETWORK_RBAC, translate_network_rbac, translate_rbac
from planemesh.xds.translate_routes import RouteMemo, translate_route_config, translate_upgrades
from planemesh.xds.translate_sla import sla_values
from planemesh.xds.translate_tcp import own_service_chain, tcp_clusters, tcp_proxy
from planemesh.xds.translate_tls import resolve_secrets, secret_uses, socket_tls

_EXT = "envoy.extensions."
HCM = _EXT + "filters.network.http_connection_manager.v3.HttpConnectionManager"
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
    "access_log",
    "per_connection_buffer_limit_bytes",
    "listener_filters_timeout",
    "reuse_port",
    "enable_reuse_port",
    "continue_on_listener_filters_timeout",
    "tcp_backlog_size",
    "bind_to_port",
}
_ORIGINAL_DST = _EXT + "filters.listener.original_dst.v3.OriginalDst"
_LISTENER_CHECKED = {"address", "filter_chains", "default_filter_chain", "listener_filters", "use_original_dst"}
_LISTENER_CHECKED |= {"internal_listener"}  # xds/translate_internal.py
_LISTENER_CHECKED |= {"traffic_direction"}  # a plane's SLA mTLS leaves OUTBOUND chains alone
_LISTENER_IGNORED = {
    "additional_addresses": "the [::] twin of a 0.0.0.0 listener: planemesh intercepts both families alike",
    "connection_balance_config": "the kernel spreads accepted connections over a plane's workers",
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
    "generate_request_id",
    "server_name",
    "merge_slashes",
    "xff_num_trusted_hops",
    "upgrade_configs",
    "tracing",
    "http_protocol_options",
    "http2_protocol_options",
    "forward_client_cert_details",  # x-forwarded-client-cert: agent/proxy/xfcc.py
    "set_current_client_cert_details",
}
_HCM_IGNORED = {
    "request_id_extension": "the UUID request id is Envoy's default; planemesh keeps or adds x-request-id alike",
    "stream_idle_timeout": (
        "planemesh bounds a stream by the request timeout and the connection idle timeout (istiod: 0s = off)"
    ),
    "normalize_path": (
        "planemesh matches routes on the path as received; only dot-segment/percent-encoded paths differ, and "
        "path-based authorization (where normalization is a security matter) is refused, not ignored"
    ),
    "path_with_escaped_slashes_action": "as normalize_path: %2F stays as received",
    "use_remote_address": (
        "decides whether x-forwarded-for is trusted for internal/external checks; planemesh appends the "
        "downstream address and trusts x-forwarded-for for nothing"
    ),
    "internal_address_config": "goes with use_remote_address",
    "preserve_external_request_id": "x-request-id from the client is kept, as with this field",
    "always_set_request_id_in_response": "adds x-request-id to responses for information only",
}


@dataclasses.dataclass(slots=True)
class _Acc:
    """What the listeners produce besides Listener objects: inline routes and plane SLA overrides."""

    routes: dict[str, RouteConfig]
    sla: dict[str, dict[str, object]]  # plane -> field -> value
    sla_origin: dict[tuple[str, str], str]  # (plane, field) -> listener that set it
    tcp_clusters: list[tuple[str, str]]  # (path, cluster) for tcp_proxy cluster references
    inbound: set[str] = dataclasses.field(default_factory=set)  # listeners from a capture (virtualInbound) chain
    secrets_used: dict[str, tuple[str, type]] = dataclasses.field(default_factory=dict)  # xds/translate_tls.py
    secrets_inline: dict[str, Secret] = dataclasses.field(default_factory=dict)
    tls_paths: dict[int, str] = dataclasses.field(default_factory=dict)  # id(TlsContext) -> its chain's path


def _planes_of(listener, planes: tuple[Plane, ...], ip: str, binds: bool, path: str) -> list[Plane]:
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
    if plane is not None:
        return [plane]
    if not binds:  # a service VIP (istiod's per-service listeners): on whichever plane the connection arrives
        return list(planes)
    raise ConfigError(f"{path}.address", f"{ip} belongs to no plane of this node; set metadata planemesh.plane")


def _set_sla(acc: _Acc, planes: list[Plane], key: str, value: object, listener: str, path: str) -> None:
    for plane in planes:
        prev = acc.sla.setdefault(plane.name, {}).get(key)
        if prev is not None and prev != value:
            other = acc.sla_origin[(plane.name, key)]
            raise ConfigError(path, f"plane {plane.name!r} {key} is {value} here but {prev} in listener {other!r}")
        acc.sla[plane.name][key] = value
        acc.sla_origin[(plane.name, key)] = listener


@dataclasses.dataclass(slots=True)
class _Where:
    """What a chain of one listener inherits: planes, port, the destination a non-binding listener stands for."""

    planes: list[Plane]
    port: int
    vip: tuple[IPNetwork, ...]  # a non-binding listener's own address: the destination it serves
    capture: bool  # istiod's virtualInbound: chains are matched on the original destination
    direction: TrafficDirection = TrafficDirection.UNSPECIFIED  # the listener's traffic_direction


def _prefixes(m, path: str) -> list[IPNetwork]:
    prefixes = []
    for i, rng in enumerate(m.prefix_ranges):
        ppath = f"{path}.filter_chain_match.prefix_ranges[{i}]"
        ip = parse_ip(rng.address_prefix, ppath)
        length = rng.prefix_len.value if rng.HasField("prefix_len") else (32 if ":" not in ip else 128)
        if length > (32 if ":" not in ip else 128):
            raise ConfigError(f"{ppath}.prefix_len", f"{length} is too long for {ip}")
        prefixes.append(IPNetwork(f"{ip}/{length}").cidr)
    return prefixes


def _skipped_chain(listener, chain, where: _Where, path: str) -> bool:
    """Chains planemesh has no use for, noted: a capture listener's catch-alls."""
    m = chain.filter_chain_match
    if where.capture and not m.HasField("destination_port"):
        note_ignored(
            path,
            "a capture listener's catch-all: connections to ports no chain declares are passed to their original "
            "destination by planemesh's interception (plane undeclared-ports setting)",
        )
        return True
    if where.capture and m.destination_port.value == where.port:
        note_ignored(path, "refuses direct connections to the capture port; planemesh's TC program does so")
        return True
    return False


def _terminal(chain) -> str | None:
    return type_name(chain.filters[-1].typed_config.type_url) if chain.filters else None


_CHAIN_FIELDS = {"filter_chain_match", "filters", "name", "metadata", "transport_socket_connect_timeout"}
_MATCH_FIELDS = {"destination_port", "prefix_ranges", "server_names", "transport_protocol", "application_protocols"}


@dataclasses.dataclass(slots=True)
class _Terminal:
    """What a chain's last filter makes of it: an HTTP connection manager's routes and filters, or tcp_proxy's
    clusters."""

    protocol: ListenerProtocol
    route_config: str | None = None
    filters: tuple[HttpFilter, ...] = ()
    upgrades: tuple[UpgradeConfig, ...] = ()  # Envoy: an HCM without upgrade_configs refuses every upgrade
    xfcc: tuple[str, tuple[str, ...]] = ("sanitize", ())
    tcp_clusters: tuple[WeightedCluster, ...] = ()
    own_service: bool = False  # istiod's default chain of the listener's own service (xds/translate_tcp.py)
    trace_sampling: float | None = None  # HCM tracing: the new traces' sampled percentage; None: no tracing


def _chain_match(m, where: _Where, path: str) -> tuple[int, list[IPNetwork]]:
    """filter_chain_match checked -> (destination port, destination prefixes)."""
    mpath = f"{path}.filter_chain_match"
    if m.transport_protocol not in ("", "tls", "raw_buffer"):
        raise ConfigError(f"{mpath}.transport_protocol", f"{m.transport_protocol!r}: expected tls or raw_buffer")
    only(m, _MATCH_FIELDS, mpath)
    port = where.port
    if m.HasField("destination_port"):
        port = m.destination_port.value
        if not 1 <= port <= 65535:
            raise ConfigError(f"{mpath}.destination_port", f"{port} is not a TCP port")
    for i, name in enumerate(m.server_names):
        if (why := server_name_error(name)) is not None:
            raise ConfigError(f"{mpath}.server_names[{i}]", why)
    return port, _prefixes(m, path) or list(where.vip)


def _network_rbac(chain, path: str) -> list:
    """The filters before the terminal one: network RBAC in front of tcp_proxy is enforced (xds/translate_rbac.py,
    agent/proxy/tcp_authz.py); the others are checked (xds/translate_filters.py)."""
    network_rbac = []
    for i, flt in enumerate(chain.filters[:-1]):
        tcp_rbac = type_name(flt.typed_config.type_url) == NETWORK_RBAC and _terminal(chain) == TCP_PROXY
        if tcp_rbac and (rbac := translate_network_rbac(flt.typed_config, f"{path}.filters[{i}]")) is not None:
            network_rbac.append(rbac)
            continue
        network_filter(flt, f"{path}.filters[{i}]")
    return network_rbac


def _terminal_filter(listener, chain, ci: int, where: _Where, port: int, acc: _Acc, fpath: str) -> _Terminal:
    last = chain.filters[-1]
    kind = type_name(last.typed_config.type_url)
    if kind == HCM:
        route_config, filters, upgrades, xfcc, trace = _hcm(listener, last, ci, chain.name, where.planes, acc, fpath)
        return _Terminal(ListenerProtocol.HTTP, route_config, filters, upgrades, xfcc, trace_sampling=trace)
    if kind == TCP_PROXY:
        tcp = tcp_proxy(last, fpath)
        clusters = tcp_clusters(tcp, fpath)
        acc.tcp_clusters += [(f"{fpath}.cluster", w.name) for w in clusters]
        own = own_service_chain(chain, tcp, port, vip=bool(where.vip) and not where.capture)
        return _Terminal(ListenerProtocol.TCP, tcp_clusters=clusters, own_service=own)
    raise ConfigError(fpath, f"network filter {last.name!r} ({kind or 'no typed_config'}) is not supported")


def _chain(listener, chain, ci: int, where: _Where, acc: _Acc, path: str) -> list[Listener]:
    only(chain, _CHAIN_FIELDS | {"transport_socket"}, path)
    tls = socket_tls(chain, path, upstream=False)  # xds/translate_tls.py
    m = chain.filter_chain_match
    port, prefixes = _chain_match(m, where, path)
    if not chain.filters:
        raise ConfigError(
            f"{path}.filters", "a filter chain needs a terminal filter (http_connection_manager or tcp_proxy)"
        )
    network_rbac = _network_rbac(chain, path)
    term = _terminal_filter(listener, chain, ci, where, port, acc, f"{path}.filters[{len(chain.filters) - 1}]")
    if tls is not None:  # HTTP: agent/proxy/tls.py; tcp_proxy: terminated, then relayed (agent/proxy/tcp_tls.py)
        acc.tls_paths[id(tls)] = f"{path}.transport_socket"  # its secrets' user, if it is served
    # TCP: agent/proxy/sni_routing.py; a TLS chain's: whether a sniffed port terminates (agent/proxy/sniff_tls.py)
    alpn = tuple(m.application_protocols) if term.protocol is ListenerProtocol.TCP or tls is not None else ()
    if m.application_protocols and term.protocol is ListenerProtocol.HTTP:
        note_ignored(
            f"{path}.filter_chain_match",
            "application_protocols: planemesh tells HTTP from other bytes by sniffing (an HTTP chain and a TCP "
            "chain on one destination become one sniffed listener); transport_protocol splits TLS from plaintext",
        )
    base = chain.name or (listener.name if ci == 0 else f"{listener.name}#{ci}")
    if where.capture:  # istiod names virtualInbound's chains like the outbound listeners of the same port
        base = f"{listener.name}/{base}"
    return [
        Listener(
            name=base if len(where.planes) == 1 else f"{base}@{plane.name}",
            plane=plane.name,
            port=port,
            protocol=term.protocol,
            prefixes=tuple(prefixes),
            route_config=term.route_config,
            http_filters=term.filters,
            server_names=tuple(n.lower() for n in m.server_names),
            tcp_clusters=term.tcp_clusters,
            upgrades=term.upgrades,
            tls=tls,
            transport_protocol=m.transport_protocol,
            forward_client_cert=term.xfcc[0],
            client_cert_details=term.xfcc[1],
            network_rbac=tuple(network_rbac),
            application_protocols=alpn,
            own_service=term.own_service,
            direction=where.direction,
            trace_sampling=term.trace_sampling,
        )
        for plane in where.planes
    ]


def _hcm(listener, last, ci: int, chain_name: str, planes: list[Plane], acc: _Acc, fpath: str):
    """An http_connection_manager -> (route config name, HTTP filters, upgrades, XFCC, trace sampling); inline
    routes go to acc."""
    hcm = hcm_pb2.HttpConnectionManager()
    last.typed_config.Unpack(hcm)
    only(hcm, _HCM_SUPPORTED, fpath, _HCM_IGNORED)
    if hcm.HasField("rds"):
        route_config = hcm.rds.route_config_name
        if not route_config:
            raise ConfigError(f"{fpath}.rds.route_config_name", "empty")
    elif hcm.HasField("route_config"):
        rc = translate_route_config(hcm.route_config, f"{fpath}.route_config")
        route_config = rc.name or f"{listener.name}.inline.{chain_name or ci}"
        known = acc.routes.get(route_config)
        if known is not None and known != RouteConfig(route_config, rc.virtual_hosts):
            raise ConfigError(f"{fpath}.route_config.name", f"route configuration {route_config!r} is defined twice")
        acc.routes[route_config] = RouteConfig(route_config, rc.virtual_hosts)
    else:
        raise ConfigError(fpath, "needs rds or an inline route_config (scoped routes are not supported)")
    filters = http_filters(hcm, fpath, translate_rbac)  # HTTP RBAC: xds/translate_rbac.py
    upgrades = translate_upgrades(hcm.upgrade_configs, f"{fpath}.upgrade_configs", route_level=False)
    if (timeout := opt_seconds(hcm, "request_timeout")) is not None and timeout > 0:
        _set_sla(acc, planes, "request_timeout_s", timeout, listener.name, f"{fpath}.request_timeout")
    idle = opt_seconds(hcm.common_http_protocol_options, "idle_timeout")
    if idle is not None and idle > 0:
        _set_sla(acc, planes, "idle_timeout_s", idle, listener.name, f"{fpath}.common_http_protocol_options")
    if hcm.HasField("http2_protocol_options"):
        for key, value, where in http2_limits(hcm.http2_protocol_options, f"{fpath}.http2_protocol_options"):
            _set_sla(acc, planes, key, value, listener.name, where)
    return route_config, filters, upgrades, _xfcc(hcm, fpath), _trace_sampling(hcm, fpath)


def _trace_sampling(hcm, path: str) -> float | None:
    """HCM `tracing` -> the percentage of new traces sampled: random_sampling x overall_sampling (each 100 when
    unset, as Envoy); None without `tracing`: Envoy then adds no trace context and leaves a request's own trace
    headers as they came. The provider, tags and client_sampling decorate spans planemesh does not export."""
    if not hcm.HasField("tracing"):
        return None
    tracing = hcm.tracing
    percent = 100.0
    for name in ("random_sampling", "overall_sampling"):
        value = getattr(tracing, name).value if tracing.HasField(name) else 100.0
        if not 0.0 <= value <= 100.0:
            raise ConfigError(f"{path}.tracing.{name}", f"{value:g} is not a percentage (0 to 100)")
        percent = percent * value / 100.0
    return percent


def _xfcc(hcm, path: str) -> tuple[str, tuple[str, ...]]:
    """forward_client_cert_details / set_current_client_cert_details (agent/proxy/xfcc.py)."""
    mode = hcm_pb2.HttpConnectionManager.ForwardClientCertDetails.Name(hcm.forward_client_cert_details).lower()
    if mode not in XFCC_MODES:
        raise ConfigError(f"{path}.forward_client_cert_details", f"{mode.upper()} is not supported")
    details = hcm.set_current_client_cert_details
    only(details, XFCC_DETAILS, f"{path}.set_current_client_cert_details")
    subject = details.HasField("subject") and details.subject.value  # a BoolValue; uri and dns are bools
    return mode, tuple(d for d in XFCC_DETAILS if (subject if d == "subject" else getattr(details, d)))


def translate_listener(listener, planes: tuple[Plane, ...], acc: _Acc, path: str) -> list[Listener]:
    only(
        listener,
        _LISTENER_HARMLESS | _LISTENER_CHECKED,
        path,
        _LISTENER_IGNORED,
    )
    if internal_listener(listener, path):  # xds/translate_internal.py: reachable by no accepted endpoint
        return []
    ip, port = socket_address(listener.address, f"{path}.address")
    binds = not listener.HasField("bind_to_port") or listener.bind_to_port.value
    mine = _planes_of(listener, planes, ip, binds, path)
    capture = False
    for i, lf in enumerate(listener.listener_filters):
        kind = type_name(lf.typed_config.type_url)
        if kind not in LISTENER_FILTERS:
            raise ConfigError(f"{path}.listener_filters[{i}]", f"listener filter {lf.name!r} is not supported")
        capture = capture or kind == _ORIGINAL_DST
    _listener_sla(listener, mine, acc, path)
    if listener.HasField("use_original_dst") and listener.use_original_dst.value:
        capture_chain_listeners(listener, path)
        return []
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    if not chains:
        raise ConfigError(f"{path}.filter_chains", "a listener needs at least one filter chain")
    vip = () if binds or ip in ("0.0.0.0", "::") else (IPNetwork(ip).cidr,)
    # istiod's virtualInbound: original_dst plus chains for other destination ports than its own.
    capture = capture and binds and any(_other_port(c, port) for c in chains)
    where = _Where(planes=mine, port=port, vip=vip, capture=capture, direction=traffic_direction(listener, path))
    out: list[Listener] = []
    paths: list[str] = []
    names: set[str] = set()
    for ci, chain in enumerate(chains):
        cpath = f"{path}.filter_chains[{ci}]" if ci < len(listener.filter_chains) else f"{path}.default_filter_chain"
        if _skipped_chain(listener, chain, where, cpath):
            continue
        for lsn in _chain(listener, chain, ci, where, acc, cpath):
            if lsn.name in names:  # istiod reuses a chain name for its tls and raw_buffer variants
                lsn = dataclasses.replace(lsn, name=f"{lsn.name}#{ci}")
            names.add(lsn.name)
            out.append(lsn)
            paths.append(cpath)
    merged = merge_same_destination(out, paths)
    if where.capture:
        acc.inbound.update(lsn.name for lsn in merged)
    return merged


def _other_port(chain, port: int) -> bool:
    m = chain.filter_chain_match
    return m.HasField("destination_port") and m.destination_port.value != port


def _listener_sla(listener, mine: list[Plane], acc: _Acc, path: str) -> None:
    for key, value, where in sla_values(planemesh_metadata(listener.metadata).get("sla") or {}, path):
        _set_sla(acc, mine, key, value, listener.name, where)


def _guarded(errors: Errors, path: str, fn, *args):
    """One resource's translation; a malformed nested message (an undecodable typed_config) is its error."""
    try:
        return fn(*args)
    except ConfigError as exc:
        errors.add(exc)
    except (DecodeError, ValueError, TypeError, KeyError) as exc:
        errors.add(ConfigError(path, f"malformed resource: {exc}"))
    return None


def _wire(msg) -> bytes:
    """A digest of the message's deterministic encoding (16 bytes kept per cluster and CLA, not the messages')."""
    return hashlib.blake2b(msg.SerializeToString(deterministic=True), digest_size=16).digest()


class TranslationCache:
    """Results of earlier translations, reused while a resource is the very same message object.

    The client state machine passes on the same message objects for every resource an update did not
    touch, so one changed ClusterLoadAssignment retranslates one cluster instead of all of them (1,000
    clusters x 10 endpoints: ~220 ms -> a few ms per change). Entries hold strong references to their
    inputs, so an identity check can never match a recycled id. Only successes are kept: a bad resource
    is translated (and refused) again on every update. Messages must not be mutated after delivery.
    """

    def __init__(self) -> None:
        self._clusters: dict[str, tuple[object, object, tuple[Plane, ...], Cluster, tuple]] = {}
        self._routes: dict[str, tuple[object, RouteConfig]] = {}
        self.route_memos: dict[str, RouteMemo] = {}  # per route config: its unchanged virtual hosts and routes
        self.hits = 0
        self.misses = 0

    def cluster(self, name: str, cluster, endpoints, planes: tuple[Plane, ...], path: str) -> Cluster:
        service = eds_name(cluster)
        cla = endpoints.get(service) if service is not None else None
        hit = self._clusters.get(name)
        if hit is not None and hit[0] is cluster and hit[1] is cla and (hit[2] is planes or hit[2] == planes):
            self.hits += 1
            return hit[3]
        # SotW resends every ClusterLoadAssignment as a new message: the same bytes are the same translation
        # (a one-endpoint change in 1,000 clusters: serializing them costs ~10 ms, translating them ~150 ms).
        wire = (_wire(cluster), _wire(cla) if cla is not None else None)
        if hit is not None and hit[4] == wire and (hit[2] is planes or hit[2] == planes):
            self.hits += 1
            self._clusters[name] = (cluster, cla, planes, hit[3], wire)
            return hit[3]
        self.misses += 1
        result = translate_cluster(cluster, endpoints, planes, path)
        self._clusters[name] = (cluster, cla, planes, result, wire)
        return result

    def route(self, name: str, rc, path: str) -> RouteConfig:
        hit = self._routes.get(name)
        if hit is not None and hit[0] is rc:
            self.hits += 1
            return hit[1]
        self.misses += 1
        result = translate_route_config(rc, path, self.route_memos.setdefault(name, RouteMemo()))
        self._routes[name] = (rc, result)
        return result

    def retain(self, clusters: Mapping[str, object], routes: Mapping[str, object]) -> None:
        """Forget resources that are gone (the cache never outgrows the current set)."""
        if len(self._clusters) > len(clusters) or any(n not in clusters for n in self._clusters):
            self._clusters = {n: v for n, v in self._clusters.items() if n in clusters}
        if len(self._routes) > len(routes) or any(n not in routes for n in self._routes):
            self._routes = {n: v for n, v in self._routes.items() if n in routes}
        if any(n not in routes for n in self.route_memos):
            self.route_memos = {n: v for n, v in self.route_memos.items() if n in routes}


def translate(resources: XdsResources, planes: tuple[Plane, ...], cache: TranslationCache | None = None) -> Snapshot:
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
    listeners = drop_shadowed_inbound(listeners, acc.inbound)
    available = set(resources.secrets)  # TLS with a plaintext path but no secrets: plaintext (translate_mtls.py)
    clusters = {name: served_cluster(c, available) for name, c in clusters.items()}
    listeners = served_listeners(listeners, available)
    for lsn in listeners:
        if lsn.tls is not None:
            secret_uses(lsn.tls, acc.tls_paths[id(lsn.tls)], acc.secrets_used, acc.secrets_inline)
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
        for tls in (c.tls, *(m.tls for m in c.tls_matches)):
            if tls is not None:
                secret_uses(tls, f"cluster[{name}].transport_socket", acc.secrets_used, acc.secrets_inline)
    new_planes = tuple(
        dataclasses.replace(p, sla=dataclasses.replace(p.sla, **acc.sla[p.name])) if p.name in acc.sla else p
        for p in planes
    )
    for p in new_planes:  # a plane whose SLA (listener metadata included) requires mTLS needs its Secrets
        if (ctx := plane_tls(p.sla)) is not None:
            secret_uses(ctx, f"planes[{p.name}].sla.mtls_cert", acc.secrets_used, acc.secrets_inline)
    secrets = resolve_secrets(acc.secrets_used, resources.secrets, acc.secrets_inline, errors)
    cache.retain(resources.clusters, resources.routes)
    errors.raise_if_any()
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
