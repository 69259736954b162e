"""Snapshot -> data-path policy: pure translation, no kernel, no I/O.

A Listener declares (plane, port[, destination prefixes]) with a protocol: HTTP is proxied (PROXY),
plain TCP is bypassed in the kernel (BYPASS) where that is what its tcp_proxy would do, else relayed by the
plane's sniffing listener (SNIFF; `keeps_destination`, `_inspected`). Ports nobody declared follow the plane's
`undeclared` setting. The loader (ebpf/loader.py) turns the result into map entries.

A listener with `sources` (a local workload's outbound configuration: agent/workloads/merge.py) gives rules
for traffic from those addresses only (`source_rules`, map pm_src_policy): two pods with different
configurations for one destination get different actions in the kernel. Like Envoy's filter_chain_match
(destination before source), the longest destination prefix wins: each source's set also holds the node-wide
rules of its (plane, port), and its own rule wins at an equal prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from planemesh.ebpf.abi import PM_MAX_PLANES, PM_MAX_SRC_POLICY, Action
from planemesh.model.config import (
    Cluster,
    ClusterKind,
    ConfigError,
    Listener,
    ListenerProtocol,
    Snapshot,
    TrafficDirection,
)
from planemesh.model.ip import AddrFormatError, IPAddress, IPNetwork
from planemesh.model.planes import Plane, UndeclaredPorts
from planemesh.model.tls_config import endpoint_tls

_LISTENER_ACTION = {ListenerProtocol.HTTP: Action.PROXY, ListenerProtocol.TCP: Action.BYPASS}
_UNDECLARED_ACTION = {UndeclaredPorts.BYPASS: Action.BYPASS, UndeclaredPorts.SNIFF: Action.SNIFF}


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One policy-trie key: (plane, port) for any destination, or (plane, port, prefix)."""

    plane_id: int
    port: int
    prefix: str | None = None  # canonical CIDR ("198.18.1.0/24", "fd00:18::/64"); None: any destination

    def sort_key(self) -> tuple[int, int, str]:
        return (self.plane_id, self.port, self.prefix or "")

    def __post_init__(self) -> None:
        if not 1 <= self.plane_id < PM_MAX_PLANES:
            raise ValueError(f"plane id {self.plane_id} is outside 1..{PM_MAX_PLANES - 1}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"{self.port} is not a TCP port")
        if self.prefix is not None:
            try:
                canonical = str(IPNetwork(self.prefix).cidr)
            except (AddrFormatError, TypeError, ValueError) as exc:
                raise ValueError(f"{self.prefix!r} is not an IP prefix") from exc
            if canonical != self.prefix:
                object.__setattr__(self, "prefix", canonical)


@dataclass(frozen=True, slots=True)
class SourceRule:
    """One pm_src_policy key: traffic from `source` (a whole address) matching `rule`."""

    source: str  # canonical address ("198.18.0.2", "fd00:18::2")
    rule: PolicyRule

    def sort_key(self) -> tuple[str, int, int, str]:
        return (self.source, *self.rule.sort_key())

    def __post_init__(self) -> None:
        try:
            net = IPNetwork(self.source)
        except (AddrFormatError, TypeError, ValueError) as exc:
            raise ValueError(f"{self.source!r} is not an IP address") from exc
        if net.size != 1:
            raise ValueError(f"source {self.source} is a prefix, not one address")
        if self.rule.prefix is not None and IPNetwork(self.rule.prefix).version != net.version:
            raise ValueError(f"source {self.source} and destination {self.rule.prefix} are of different families")
        if str(net.ip) != self.source:
            object.__setattr__(self, "source", str(net.ip))


@dataclass(frozen=True, slots=True)
class PlaneSettings:
    plane_id: int
    proxy_port: int
    sniff_port: int
    undeclared: Action
    fail_closed: bool = False
    forward_to: frozenset[int] = frozenset()  # plane ids whose addresses this plane's traffic may reach


@dataclass(frozen=True, slots=True)
class DatapathPolicy:
    planes: tuple[PlaneSettings, ...] = ()
    rules: Mapping[PolicyRule, Action] = field(default_factory=lambda: MappingProxyType({}))
    destinations: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # CIDR -> plane id
    source_rules: Mapping[SourceRule, Action] = field(default_factory=lambda: MappingProxyType({}))


def plane_settings(plane: Plane, plane_ids: Mapping[str, int] | None = None) -> PlaneSettings:
    """`plane_ids` (name -> id of every plane) resolves `forward_to`; without it the plane reaches no other."""
    return PlaneSettings(
        plane_id=plane.plane_id,
        proxy_port=plane.proxy_port,
        sniff_port=plane.sniff_port,
        undeclared=_UNDECLARED_ACTION[plane.undeclared],
        fail_closed=plane.sla.fail_closed,
        forward_to=frozenset((plane_ids or {})[name] for name in plane.forward_to if name in (plane_ids or {})),
    )


def policy_from_snapshot(snap: Snapshot) -> DatapathPolicy:
    """The BPF view of a snapshot. Raises ConfigError (naming the listener) on contradictions."""
    plane_ids = {plane.name: plane.plane_id for plane in snap.planes}
    rules: dict[PolicyRule | SourceRule, Action] = {}
    owner: dict[PolicyRule | SourceRule, str] = {}
    sni_routed: set[PolicyRule | SourceRule] = set()
    strict = strict_planes(snap)
    for i, lsn in enumerate(snap.listeners):
        where = f"listeners[{i}]"
        if lsn.plane not in plane_ids:
            raise ConfigError(f"{where}.plane", f"unknown plane {lsn.plane!r}")
        action = Action.SNIFF if lsn.sniff else _LISTENER_ACTION[lsn.protocol]
        for key in _listener_keys(lsn, plane_ids[lsn.plane], where):
            if key in rules and rules[key] is not action:
                rule = key.rule if isinstance(key, SourceRule) else key
                raise ConfigError(
                    where, f"{rule.prefix or 'any destination'} port {rule.port} is already {owner[key]!r}'s"
                )
            rules[key] = action
            owner[key] = lsn.name
            if action is Action.BYPASS and (strict_chain(lsn, strict) or _inspected(lsn, snap.clusters)):
                sni_routed.add(key)
    # TCP chains routed by TLS SNI, authorized (network RBAC), terminating TLS, sent to a cluster that would not
    # pick the original destination, or not OUTBOUND on a plane whose SLA requires mTLS (strict): the sniffing
    # listener takes them (sni_routing.py, passthrough.py, tls.py plane_tcp_chains) instead of the kernel bypass.
    for key in sni_routed:
        rules[key] = Action.SNIFF
    node = {k: a for k, a in rules.items() if isinstance(k, PolicyRule)}
    own = {k: a for k, a in rules.items() if isinstance(k, SourceRule)}
    planes = tuple(sorted((plane_settings(p, plane_ids) for p in snap.planes), key=lambda s: s.plane_id))
    destinations = {str(net.cidr): plane.plane_id for plane in snap.planes for net in plane.cidrs}
    folded = fold_source_rules(own, node)
    if len(folded) > PM_MAX_SRC_POLICY:  # refused before anything is applied (the map would refuse the rest)
        raise ConfigError(
            "listeners", f"{len(folded)} per-source kernel rules, the data path holds {PM_MAX_SRC_POLICY}"
        )
    return DatapathPolicy(
        planes=planes,
        rules=MappingProxyType(node),
        destinations=MappingProxyType(destinations),
        source_rules=MappingProxyType(folded),
    )


def _listener_keys(lsn: Listener, plane_id: int, where: str) -> list[PolicyRule | SourceRule]:
    """The listener's policy keys: per destination prefix (or any), and per source address when it has sources.
    Raises ConfigError (naming `where`) on a bad port, prefix or source."""
    try:
        keys = [PolicyRule(plane_id, lsn.port, str(net.cidr)) for net in lsn.prefixes] or [
            PolicyRule(plane_id, lsn.port)
        ]
        if not lsn.sources:
            return list(keys)
        scoped: list[PolicyRule | SourceRule] = []
        for src in lsn.sources:
            if src.size != 1:
                raise ValueError(f"source {src} is a prefix: the data path scopes by whole source addresses")
            for key in keys:
                if key.prefix is None or IPNetwork(key.prefix).version == src.version:
                    scoped.append(SourceRule(str(src.ip), key))
        return scoped
    except ValueError as exc:
        raise ConfigError(where, str(exc)) from exc


def fold_source_rules(own: Mapping[SourceRule, Action], node: Mapping[PolicyRule, Action]) -> dict[SourceRule, Action]:
    """Each source's rules plus the node-wide rules of the same (plane, port) and family that it does not
    override: the kernel decides on the source's set alone when it has a hit, and the longest destination
    prefix must still win (a server pod's inbound chain at its address beats a client's `0.0.0.0_PORT`)."""
    out = dict(own)
    groups = {(k.source, k.rule.plane_id, k.rule.port) for k in own}
    by_port: dict[tuple[int, int], list[tuple[PolicyRule, Action]]] = {}
    for rule, action in node.items():
        by_port.setdefault((rule.plane_id, rule.port), []).append((rule, action))
    for source, plane_id, port in groups:
        version = IPNetwork(source).version
        for rule, action in by_port.get((plane_id, port), ()):
            if rule.prefix is not None and IPNetwork(rule.prefix).version != version:
                continue
            out.setdefault(SourceRule(source, rule), action)
    return out


def _inspected(lsn: Listener, clusters: Mapping[str, Cluster]) -> bool:
    """A tcp_proxy chain the proxy must see (tcp_handling)."""
    return lsn.protocol is ListenerProtocol.TCP and not tcp_handling(lsn, clusters)[0]


def tcp_handling(lsn: Listener, clusters: Mapping[str, Cluster]) -> tuple[bool, str]:
    """(kernel bypass, why) for a tcp_proxy chain. The proxy must see a chain routed by SNI, authorized by network
    RBAC or terminating TLS, and one whose cluster would not send the connection where the kernel's bypass does
    (keeps_destination): the plane's sniffing listener relays those (SNIFF)."""
    if lsn.server_names:
        return False, "routed by TLS server name"
    if lsn.network_rbac:
        return False, "authorized by network RBAC"
    if lsn.tls is not None:
        return False, "terminates TLS"
    if originates_tls(lsn, clusters):
        return False, "originates TLS to its cluster's endpoints (transport_socket_matches / transport_socket)"
    why = keeps_destination(lsn, clusters)
    if why is not None:
        return True, why
    if len(lsn.tcp_clusters) > 1:
        return False, "splits by weight between clusters"
    return False, "its cluster would not pick the original destination"


def originates_tls(lsn: Listener, clusters: Mapping[str, Cluster]) -> bool:
    """Some endpoint of the chain's clusters is reached over TLS (Istio auto-mTLS: `tlsMode: istio` endpoints),
    or an ORIGINAL_DST cluster's own transport_socket is TLS: the proxy must originate it
    (agent/proxy/tcp_originate.py), the kernel's bypass would send plaintext."""
    for weighted in lsn.tcp_clusters:
        cluster = clusters.get(weighted.name)
        if cluster is None or (cluster.tls is None and not cluster.tls_matches):
            continue
        if cluster.kind is ClusterKind.ORIGINAL_DST and cluster.tls is not None:
            return True
        if any(endpoint_tls(cluster, ep, (ep.address, ep.port)) is not None for ep in cluster.endpoints):
            return True
    return False


def keeps_destination(lsn: Listener, clusters: Mapping[str, Cluster]) -> str | None:
    """Why the chain's tcp_proxy would connect to the connection's original destination, so that the kernel's
    bypass does what the proxy would; None when it would not. Bypassed: no cluster (a static TCP listener), an
    ORIGINAL_DST (passthrough) cluster, istiod's default chain of the listener's own service (`own_service`,
    xds/translate_tcp.py: the service address is that cluster's), or a cluster whose healthy endpoints hold every
    destination the chain matches (whole addresses, at the listener's port). Anything else (a weighted split,
    another service, a subset, another port, a cluster not known yet or with no endpoints) is relayed by the
    proxy to the cluster."""
    if not lsn.tcp_clusters:
        return "no cluster: the original destination"
    if len(lsn.tcp_clusters) > 1:
        return None
    if lsn.own_service:
        return "istiod's default chain of the listener's own service (VIP_PORT -> outbound|PORT||HOST)"
    cluster = clusters.get(lsn.tcp_clusters[0].name)
    if cluster is None:
        return None
    if cluster.kind is ClusterKind.ORIGINAL_DST:
        return "ORIGINAL_DST (passthrough) cluster"
    if not lsn.prefixes or any(net.size != 1 for net in lsn.prefixes):
        return None
    held = set()
    for ep in cluster.endpoints:
        if ep.healthy and ep.port == lsn.port:
            try:
                held.add(IPAddress(ep.address))
            except (AddrFormatError, ValueError, TypeError):  # a DNS cluster's host name
                continue
    return "the cluster's endpoints hold the destination" if all(net.ip in held for net in lsn.prefixes) else None


def strict_planes(snap: Snapshot) -> frozenset[str]:
    """Planes whose SLA requires mTLS (model/planes.py SLA.mtls): the kernel bypasses none of their tcp_proxy
    chains, which would let plaintext through unauthenticated; the proxy terminates them. Their undeclared
    ports follow `undeclared` (bypass: not proxied traffic, never seen by the agent)."""
    return frozenset(p.name for p in snap.planes if p.sla.mtls == "strict")


def strict_chain(lsn: Listener, strict: frozenset[str]) -> bool:
    """A chain the kernel must not bypass for its plane's strict mTLS: one not of an OUTBOUND listener (a pod's
    own egress, e.g. to kube-dns :53, is originated per its cluster; Istio's STRICT governs inbound traffic)."""
    return lsn.plane in strict and lsn.direction is not TrafficDirection.OUTBOUND


def needs_sniff_listener(snap: Snapshot, plane: Plane) -> bool:
    """The plane's sniffing listener is in use: undeclared ports are sniffed, or a TCP chain is inspected."""
    strict = frozenset((plane.name,)) if plane.sla.mtls == "strict" else frozenset()
    return plane.undeclared is UndeclaredPorts.SNIFF or any(
        (lsn.protocol is ListenerProtocol.TCP and strict_chain(lsn, strict))
        or _inspected(lsn, snap.clusters)
        or lsn.sniff
        for lsn in snap.listeners_of(plane.name)
    )


def interface_planes(snap: Snapshot, links: Mapping[int, str]) -> dict[int, int]:
    """ifindex -> plane_id for the interfaces (ifindex -> name) some plane claims."""
    found: dict[int, int] = {}
    for ifindex, name in links.items():
        for plane in snap.planes:
            if plane.claims_interface(name):
                found[ifindex] = plane.plane_id
                break
    return found
