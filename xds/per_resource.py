"""Envoy's update semantics: translate an xDS update resource by resource (pure; see docs/xds.md).

Envoy applies every valid resource of an update and NACKs only the bad ones, naming them; a rejected
resource keeps its previously accepted version (or stays absent if it had none). References that cannot
be resolved are not errors:

- a route (or tcp_proxy) naming a cluster that does not exist is applied; the request is answered 503
  with response flag `NC` (the connection is reset) until the cluster appears;
- a listener naming an RDS route configuration that was never received is *warming*: it keeps serving
  its previous version if it had one, else it is not active yet. A route configuration the server removed
  while a listener still names it keeps serving its last accepted version (Envoy keeps the last config of
  an RDS subscription that still has a user);
- an EDS cluster whose ClusterLoadAssignment has not arrived is active with no endpoints (503 `UH`),
  as Envoy's cluster is once its initial fetch timed out.

`translate_update` returns the snapshot of everything accepted plus `rejected`: type URL -> resource
name -> reason, which the client state machine turns into one NACK per type naming only those.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType

from envoy.config.endpoint.v3 import endpoint_pb2

from planemesh.model.config import ConfigError, Listener, RouteConfig, Snapshot
from planemesh.model.planes import Plane
from planemesh.model.tls_config import plane_tls
from planemesh.model.validation import validate_snapshot
from planemesh.xds.client_state import XdsResources, eds_name, route_names
from planemesh.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
from planemesh.xds.translate import TranslationCache, _Acc, _guarded, translate_listener
from planemesh.xds.translate_capture import drop_shadowed_inbound
from planemesh.xds.translate_common import Errors
from planemesh.xds.translate_mtls import cluster_tls_error, secrets_of, served_cluster, served_listeners
from planemesh.xds.translate_sla import mtls_set_by

Rejected = dict[str, dict[str, str]]  # type URL -> resource name -> reason


@dataclasses.dataclass(frozen=True, slots=True)
class Translation:
    snapshot: Snapshot
    rejected: Mapping[str, Mapping[str, str]]
    warming: tuple[str, ...] = ()  # listeners not active yet: their route configuration never arrived


def _one(fn, *args) -> tuple[object | None, str | None]:
    """Run one resource's translation: (result, None) or (None, the reason)."""
    errors = Errors()
    result = _guarded(errors, "", fn, *args)
    if errors.items:
        return None, "; ".join(str(e) for e in errors.items)
    return result, None


def _with_empty_cla(cluster, endpoints: Mapping[str, object]) -> Mapping[str, object]:
    """An EDS cluster whose endpoints never arrived is active with none (Envoy, after initial fetch)."""
    service = eds_name(cluster)
    if service is None or service in endpoints:
        return endpoints
    return {**endpoints, service: endpoint_pb2.ClusterLoadAssignment(cluster_name=service)}


def _clusters(res: XdsResources, old: XdsResources | None, planes, cache: TranslationCache, rejected: Rejected):
    out = {}
    for name, cluster in sorted(res.clusters.items()):
        path = f"cluster[{name}]"
        eps = _with_empty_cla(cluster, res.endpoints)
        got, why = _one(cache.cluster, name, cluster, eps, planes, path)
        service = eds_name(cluster)
        unchanged = old is not None and old.clusters.get(name) is cluster
        if why is not None and service is not None and (unchanged or f"endpoints[{service}]" in why):
            # A failure that comes from the endpoints is the ClusterLoadAssignment's (an EDS NACK): the
            # cluster keeps the previous assignment, or has none (Envoy: warming, then no hosts).
            rejected.setdefault(ENDPOINT, {})[service] = why
            old_eps = old.endpoints if old is not None else {}
            kept = {k: v for k, v in res.endpoints.items() if k != service}
            if service in old_eps:
                kept[service] = old_eps[service]
            got, why = _one(cache.cluster, name, cluster, _with_empty_cla(cluster, kept), planes, path)
        if why is not None:
            rejected.setdefault(CLUSTER, {})[name] = why
            prev = old.clusters.get(name) if old is not None else None
            if prev is not None:
                peps = _with_empty_cla(prev, old.endpoints)  # type: ignore[union-attr]
                got, _ = _one(cache.cluster, name, prev, peps, planes, path)
        if got is not None:
            out[name] = got
    return out


def _routes(res: XdsResources, old: XdsResources | None, cache: TranslationCache, rejected: Rejected):
    out: dict[str, RouteConfig] = {}
    for name, rc in sorted(res.routes.items()):
        path = f"route_config[{name}]"
        got, why = _one(cache.route, name, rc, path)
        if why is not None:
            rejected.setdefault(ROUTE, {})[name] = why
            prev = old.routes.get(name) if old is not None else None
            if prev is not None:
                got, _ = _one(cache.route, name, prev, path)
        if got is not None:
            out[name] = got
    return out


def _fork(acc: _Acc) -> _Acc:
    """A listener's own accumulator: a failing listener leaves nothing behind (no inline route, no SLA)."""
    return _Acc(
        routes={},
        sla={p: dict(v) for p, v in acc.sla.items()},
        sla_origin=dict(acc.sla_origin),
        tcp_clusters=[],
        inbound=set(acc.inbound),  # drop_shadowed_inbound needs every capture chain of the update
    )


@dataclasses.dataclass(slots=True)
class _Listeners:
    planes: tuple[Plane, ...]
    routes: dict[str, RouteConfig]  # RDS + inline, grows as listeners are accepted
    old_routes: Mapping[str, object]
    cache: TranslationCache
    acc: _Acc = dataclasses.field(default_factory=lambda: _Acc(routes={}, sla={}, sla_origin={}, tcp_clusters=[]))
    out: list[Listener] = dataclasses.field(default_factory=list)
    owner: list[str] = dataclasses.field(default_factory=list)  # resource name of each Listener in `out`

    def add(self, name: str, msg) -> tuple[str | None, bool]:
        """Translate and take one listener: (error, warming). Nothing is taken on error or warming."""
        for rds in sorted(route_names(msg)):
            if rds in self.routes:
                continue
            prev = self.old_routes.get(rds)
            if prev is None:
                return None, True  # warming: its route configuration has not arrived
            got, _ = _one(self.cache.route, rds, prev, f"route_config[{rds}]")
            if got is None:
                return None, True
            self.routes[rds] = got  # removed by the server, still named: the last accepted version serves
        fork = _fork(self.acc)
        path = f"listener[{name}]"
        got, why = _one(translate_listener, msg, self.planes, fork, path)
        if why is not None:
            return why, False
        for rname in fork.routes:
            if rname in self.routes:
                return f"{path}: route configuration {rname!r} is also defined elsewhere", False
        self.routes.update(fork.routes)
        self.acc = dataclasses.replace(fork, routes={}, tcp_clusters=[])
        self.out += got  # type: ignore[arg-type]
        self.owner += [name] * len(got)  # type: ignore[arg-type]
        return None, False


_LISTENER_PATH = re.compile(r"^listeners\[(\d+)\]")
_SLA_PATH = re.compile(r"^planes\[(\d+)\]\.sla\.(\w+)")


def _culprit(exc: ConfigError, lst: _Listeners, planes: tuple[Plane, ...]) -> str | None:
    """The listener resource a whole-snapshot check failed on (a port clash, an SLA it set), if any."""
    if (m := _LISTENER_PATH.match(exc.path)) is not None and int(m.group(1)) < len(lst.owner):
        return lst.owner[int(m.group(1))]
    if (m := _SLA_PATH.match(exc.path)) is not None and int(m.group(1)) < len(planes):
        return lst.acc.sla_origin.get((planes[int(m.group(1))].name, m.group(2)))
    return None


def _drop_shadowed(lst: _Listeners) -> None:
    """As the whole-push translation: a virtualInbound port chain behind an outbound listener of the same
    destination is dropped, not a port clash that would refuse virtualInbound whole."""
    kept = {id(lsn) for lsn in drop_shadowed_inbound(lst.out, lst.acc.inbound)}
    pairs = [(lsn, owner) for lsn, owner in zip(lst.out, lst.owner, strict=True) if id(lsn) in kept]
    lst.out, lst.owner = [lsn for lsn, _ in pairs], [owner for _, owner in pairs]


def _tls_listeners(lst: _Listeners, available: set[str], received, secrets: dict) -> dict[str, str]:
    """Drop the TLS listeners served in plaintext (translate_mtls.py); resource -> why, for unusable secrets."""
    served = {id(lsn) for lsn in served_listeners(lst.out, available)}
    kept = [(lsn, owner) for lsn, owner in zip(lst.out, lst.owner, strict=True) if id(lsn) in served]
    lst.out, lst.owner = [lsn for lsn, _ in kept], [owner for _, owner in kept]
    bad: dict[str, str] = {}
    for lsn, owner in kept:
        if lsn.tls is not None and owner not in bad:
            why = secrets_of((lsn.tls,), f"listener[{owner}].transport_socket", received, secrets)
            if why is not None:
                bad[owner] = why
    return bad


def _served_clusters(res: XdsResources, accepted: XdsResources | None, planes: tuple[Plane, ...],
                     cache: TranslationCache, rejected: Rejected) -> tuple[dict, dict[str, object]]:  # fmt: skip
    """The accepted clusters, their TLS served or plaintext (xds/translate_mtls.py), and the secrets they use.
    ConfigError when a plane's required mTLS secrets are missing: the whole update waits, the plane must not
    fall back to plaintext."""
    clusters = _clusters(res, accepted, planes, cache, rejected)
    available = set(res.secrets)  # TLS with a plaintext path but no secrets: plaintext (xds/translate_mtls.py)
    cluster_secrets: dict[str, object] = {}
    for p in planes:  # a plane whose SLA requires mTLS needs its certificate and roots (agent/proxy/tls.py)
        user = f"planes[{p.name}].sla.mtls_cert"
        if (ctx := plane_tls(p.sla)) is not None and (why := secrets_of((ctx,), user, res.secrets, cluster_secrets)):
            raise ConfigError(user, why)
    for name in sorted(clusters):
        c = served_cluster(clusters[name], available)
        if (why := cluster_tls_error(c, res.secrets, cluster_secrets)) is not None:
            rejected.setdefault(CLUSTER, {})[name] = why
            del clusters[name]
        else:
            clusters[name] = c
    return clusters, cluster_secrets


def _listener_round(lst: _Listeners, res: XdsResources, accepted: XdsResources | None, skip: Mapping[str, str],
                    rejected: Rejected) -> list[str]:  # fmt: skip
    """Every listener of `res` but the skipped ones into `lst`; a bad or warming one keeps its previous
    version (if it still can serve). Returns the warming listeners."""
    old_listeners = accepted.listeners if accepted is not None else {}
    warming: list[str] = []
    for name, msg in sorted(res.listeners.items()):
        if name in skip:
            rejected.setdefault(LISTENER, {})[name] = skip[name]
            continue
        why, warm = lst.add(name, msg)
        if why is None and not warm:
            continue
        if why is not None:
            rejected.setdefault(LISTENER, {})[name] = why
        if warm:
            warming.append(name)
        prev = old_listeners.get(name)
        if prev is not None and prev is not msg:
            lst.add(name, prev)  # the previous version keeps serving (if it still can)
    return warming


def _snapshot(res: XdsResources, planes: tuple[Plane, ...], lst: _Listeners, clusters: dict,
              secrets: dict) -> Snapshot:  # fmt: skip
    """The round's result, with the SLA values the accepted listeners set on their planes. A plane whose SLA
    requires mTLS gets its Secrets (its listener metadata may have asked: planes[i].sla.<field> then names the
    listener to skip, _culprit); ConfigError when they have not arrived."""
    sla = lst.acc.sla
    planes = tuple(
        dataclasses.replace(p, sla=dataclasses.replace(p.sla, **sla[p.name])) if p.name in sla else p for p in planes
    )
    for i, p in enumerate(planes):
        user = f"planes[{p.name}].sla.mtls_cert"
        if (ctx := plane_tls(p.sla)) is not None and (why := secrets_of((ctx,), user, res.secrets, secrets)):
            raise ConfigError(f"planes[{i}].sla.{mtls_set_by(sla.get(p.name, {}))}", why)
    return Snapshot(
        version=f"xds:{res.version}",
        planes=planes,
        listeners=tuple(lst.out),
        routes=MappingProxyType(lst.routes),
        clusters=MappingProxyType(clusters),
        secrets=MappingProxyType(secrets),
    )


def translate_update(
    res: XdsResources,
    planes: tuple[Plane, ...],
    cache: TranslationCache | None = None,
    accepted: XdsResources | None = None,
    scope: Callable[[Listener], Listener] | None = None,
) -> Translation:
    """Every valid resource of `res` -> a validated Snapshot; the bad ones fall back to `accepted`.
    `scope`: each listener as the node will serve it (one per listener: a local workload's own traffic,
    agent/workloads/merge.py), before the whole-snapshot checks.

    Raises ConfigError only for a failure no single resource explains (the update is then NACKed whole).
    Each round takes every listener not skipped yet; a whole-snapshot check that one listener fails (a port
    clash, an SLA it set, unusable TLS secrets) skips it, NACKed, in the next round.
    """
    cache = cache or TranslationCache()
    rejected: Rejected = {}
    clusters, cluster_secrets = _served_clusters(res, accepted, planes, cache, rejected)
    available = set(res.secrets)
    routes = _routes(res, accepted, cache, rejected)
    skip: dict[str, str] = {}  # listeners dropped by a whole-snapshot check -> why
    for _ in range(len(res.listeners) + 1):
        lst = _Listeners(planes, dict(routes), accepted.routes if accepted is not None else {}, cache)
        warming = _listener_round(lst, res, accepted, skip, rejected)
        cache.retain(res.clusters, {**res.routes, **{n: None for n in lst.routes}})
        if scope is not None:  # before the shadowing check: a pod's outbound listener shadows only its own traffic
            lst.out = [scope(lsn) for lsn in lst.out]  # 1:1 with lst.owner (_culprit's indexes)
        _drop_shadowed(lst)
        secrets = dict(cluster_secrets)
        tls_bad = _tls_listeners(lst, available, res.secrets, secrets)
        if tls_bad:
            skip.update(tls_bad)  # a listener whose TLS secrets are unusable is refused whole; retry without
            continue
        try:
            snap = _snapshot(res, planes, lst, clusters, secrets)
            validate_snapshot(snap, references=False)
        except ConfigError as exc:
            culprit = _culprit(exc, lst, planes)
            if culprit is None or culprit in skip:
                raise
            skip[culprit] = f"listener[{culprit}]: {exc}"
            continue
        return Translation(snap, MappingProxyType(rejected), tuple(warming))
    raise ConfigError("listeners", "no consistent set of listeners")  # unreachable: each round skips one
