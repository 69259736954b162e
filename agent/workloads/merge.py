"""Many workloads' snapshots -> the node's one Snapshot, each workload's configuration scoped to its traffic.

Pure. istiod gives every local workload its own configuration (one ADS stream each, agent/workloads/streams.py);
the data path serves them all from one Snapshot where:

- a workload's **outbound** listeners carry its addresses as `sources` (Envoy's source_prefix_ranges): the
  router picks them for connections *from* the workload (agent/proxy/routing.py), before any other;
- a workload's **inbound** listeners (istiod's virtualInbound chains) get its addresses as destination
  `prefixes`: they serve connections *to* the workload;
- route configurations and clusters are shared by content: one name and one object for every workload that
  received the same one (the translation cache makes identical resources the very same object), and a
  `name@<digest>` variant per distinct content otherwise, with each workload's references rewritten. Memory
  grows with the number of distinct configurations, not with the number of pods.

Outbound listeners claim kernel policy keys per source address (ebpf/policy.py `source_rules`): one pod's TCP
bypass and another's HTTP proxy for one destination each keep their own action. Listeners that still claim one
key (plane, port, destination prefix, source) with different actions (one HTTP, one TCP) are reconciled: the
HTTP ones become sniffing listeners (HTTP is proxied with its routes, other bytes pass through), the TCP ones
leave the merged snapshot (noted).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from planemesh.agent.identity.spiffe import SpiffeError, istio_identity
from planemesh.agent.workloads.model import Workload
from planemesh.model.config import Cluster, Listener, ListenerProtocol, RouteConfig, Snapshot, WeightedCluster
from planemesh.model.planes import Plane

INBOUND_LISTENER = "virtualInbound"  # istiod's capture listener: its chains are named `virtualInbound/<chain>`
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Merged:
    snapshot: Snapshot
    notes: tuple[str, ...] = ()  # listeners dropped or changed to reconcile workloads (logged, admin)
    shared: Mapping[str, int] = dataclasses.field(default_factory=dict)  # "routes"/"clusters": objects kept


def is_inbound(lsn: Listener) -> bool:
    return lsn.name.split("/", 1)[0] == INBOUND_LISTENER


def _digest(obj: object) -> str:
    try:
        value = hash(obj)
    except TypeError:  # a mapping somewhere inside: fall back to its text
        return hashlib.sha256(repr(obj).encode()).hexdigest()[:8]
    return format(value & 0xFFFFFFFF, "08x")


def _share(per_workload: dict[str, Mapping[str, T]]) -> tuple[dict[str, T], dict[str, dict[str, str]]]:
    """{workload: {name: obj}} -> ({final name: obj}, {workload: {name: final name}}). One variant of a name
    keeps the name; several get `name@<digest>` each (identical objects compare by identity first: cheap)."""
    variants: dict[str, list[T]] = {}
    for items in per_workload.values():
        for name, obj in items.items():
            seen = variants.setdefault(name, [])
            if not any(v is obj or v == obj for v in seen):
                seen.append(obj)
    final: dict[str, T] = {}
    renamed: dict[str, dict[str, str]] = {}
    done: dict[tuple[str, int], str] = {}  # (name, variant) -> its final name
    for wkey, items in per_workload.items():
        names = renamed[wkey] = {}
        for name, obj in items.items():
            if len(variants[name]) == 1:
                final[name] = variants[name][0]
                names[name] = name
                continue
            index = next(i for i, v in enumerate(variants[name]) if v is obj or v == obj)
            new = done.get((name, index))
            if new is None:
                canonical = variants[name][index]
                new = f"{name}@{_digest(canonical)}"
                while new in final:
                    new += "+"  # a digest collision between different contents: never merge them
                final[new] = dataclasses.replace(canonical, name=new)  # type: ignore[type-var]
                done[name, index] = new
            names[name] = new
    return final, renamed


def _rename_clusters(rc: RouteConfig, names: Mapping[str, str]) -> RouteConfig:
    """The route configuration with every cluster reference renamed (the same object when nothing changes)."""
    rename: Callable[[str], str] = lambda n: names.get(n, n)  # noqa: E731
    if all(rename(n) == n for n in names):
        return rc
    hosts = []
    for vh in rc.virtual_hosts:
        routes = []
        for route in vh.routes:
            act = route.action
            if act is not None:
                act = dataclasses.replace(
                    act,
                    cluster=rename(act.cluster) if act.cluster else act.cluster,
                    weighted=tuple(WeightedCluster(rename(w.name), w.weight) for w in act.weighted),
                    mirrors=tuple(dataclasses.replace(m, cluster=rename(m.cluster)) for m in act.mirrors),
                )
                route = dataclasses.replace(route, action=act)
            routes.append(route)
        hosts.append(dataclasses.replace(vh, routes=tuple(routes)))
    return dataclasses.replace(rc, virtual_hosts=tuple(hosts))


def scope(lsn: Listener, w: Workload, planes: tuple[Plane, ...]) -> Listener:
    """The listener for workload `w`'s traffic only: outbound by source, inbound by destination (its addresses
    on the listener's plane). One listener in, one out (the stream's translation checks the scoped set: an
    inbound chain and an outbound listener of one port no longer collide); a listener on a plane where `w`
    has no address keeps all of `w`'s addresses and is dropped by the merge."""
    mine = w.prefixes(planes, lsn.plane) or w.prefixes(planes)
    if not is_inbound(lsn):
        return dataclasses.replace(lsn, sources=mine)
    if lsn.prefixes:
        mine = tuple(p for p in mine if any(p.version == q.version and p in q for q in lsn.prefixes)) or mine
    return dataclasses.replace(lsn, prefixes=mine)


def _scoped(lsn: Listener, w: Workload, planes: tuple[Plane, ...], routes: Mapping[str, str],
            clusters: Mapping[str, str]) -> Listener | None:  # fmt: skip
    """The listener in the node's snapshot: scoped, renamed `<name>~<pod>.<ns>`, its references renamed; None
    when `w` has no address on the listener's plane (or, inbound, none inside its destination prefixes)."""
    mine = w.prefixes(planes, lsn.plane)
    if not mine:
        return None
    inside = any(p.version == q.version and p in q for p in mine for q in lsn.prefixes)
    if is_inbound(lsn) and lsn.prefixes and not inside:
        return None
    changes: dict[str, Any] = {"name": f"{lsn.name}~{w.key}"}
    if lsn.route_config is not None:
        changes["route_config"] = routes.get(lsn.route_config, lsn.route_config)
    if lsn.tcp_clusters:
        renamed = (WeightedCluster(clusters.get(c.name, c.name), c.weight) for c in lsn.tcp_clusters)
        changes["tcp_clusters"] = tuple(renamed)
    return dataclasses.replace(scope(lsn, w, planes), **changes)


def _action(lsn: Listener) -> str:
    if lsn.sniff or (lsn.protocol is ListenerProtocol.TCP and lsn.server_names):
        return "sniff"
    return "proxy" if lsn.protocol is ListenerProtocol.HTTP else "bypass"


def _keys(lsn: Listener) -> list[tuple[str, int, str, str]]:
    """The kernel policy keys the listener claims (ebpf/policy.py): per source address when it has sources (a
    workload's outbound: pm_src_policy), so different pods' listeners of one destination never clash."""
    dests = [str(p) for p in lsn.prefixes] or [""]
    return [(lsn.plane, lsn.port, d, str(s)) for d in dests for s in (lsn.sources or ("",))]


def reconcile(listeners: list[Listener]) -> tuple[list[Listener], list[str]]:
    """Make every kernel policy key carry one action (module docstring). Pure; bounded by the listener count."""
    notes: list[str] = []
    for _ in range(len(listeners) + 1):
        actions: dict[tuple[str, int, str, str], set[str]] = {}
        for lsn in listeners:
            for key in _keys(lsn):
                actions.setdefault(key, set()).add(_action(lsn))
        clash = {k for k, a in actions.items() if len(a) > 1}
        if not clash:
            return listeners, notes
        kept = []
        for lsn in listeners:
            if not clash.intersection(_keys(lsn)):
                kept.append(lsn)
            elif lsn.protocol is ListenerProtocol.HTTP:
                if not lsn.sniff:
                    notes.append(f"listener {lsn.name}: sniffed (another workload has a TCP chain there)")
                kept.append(dataclasses.replace(lsn, sniff=True))
            else:
                notes.append(f"listener {lsn.name}: dropped (another workload proxies HTTP there; sniffed instead)")
        listeners = kept
    raise AssertionError("reconcile did not converge")  # each round drops or converts: unreachable


def principal(w: Workload, trust_domain: str) -> str:
    """The workload's SPIFFE ID `spiffe://<td>/ns/<ns>/sa/<sa>` ("" when a part is no valid segment: such a
    pod gets no identity rather than a forged one)."""
    try:
        return str(istio_identity(trust_domain, w.namespace, w.service_account))
    except SpiffeError:
        return ""


def merge(planes: tuple[Plane, ...], views: Mapping[str, tuple[Workload, Snapshot]], version: str,
          trust_domain: str = "cluster.local") -> Merged:  # fmt: skip
    """The node's Snapshot from each workload's own one (`views`: workload key -> (workload, snapshot)). A
    workload's listeners carry its SPIFFE ID in `trust_domain` (Listener.workload_principal)."""
    order = sorted(views)
    clusters, cluster_names = _share({k: views[k][1].clusters for k in order})
    routes_in = {k: {n: _rename_clusters(rc, cluster_names[k]) for n, rc in views[k][1].routes.items()} for k in order}
    routes, route_names = _share(routes_in)
    secrets: dict[str, Any] = {}
    for k in order:
        for name, secret in views[k][1].secrets.items():
            secrets.setdefault(name, secret)  # per-workload certificates: the mTLS work (docs/workloads.md)
    listeners: list[Listener] = []
    for k in order:
        workload, snap = views[k]
        spiffe = principal(workload, trust_domain)
        for lsn in snap.listeners:
            scoped = _scoped(lsn, workload, planes, route_names[k], cluster_names[k])
            if scoped is not None:
                listeners.append(dataclasses.replace(scoped, workload_principal=spiffe))
    listeners, notes = reconcile(listeners)
    snapshot = Snapshot(
        version=version,
        planes=planes,
        listeners=tuple(listeners),
        routes=MappingProxyType(routes),
        clusters=MappingProxyType(dict[str, Cluster](clusters)),
        secrets=MappingProxyType(secrets),
    )
    return Merged(snapshot, tuple(notes), MappingProxyType({"routes": len(routes), "clusters": len(clusters)}))
