"""The ADS client as a state machine without I/O (never imports grpc).

Events in: `stream_started`, `response_received`, `stream_reset`, `timer_fired`, `apply_result`.
Actions out: `SendRequest` (a DiscoveryRequest or DeltaDiscoveryRequest to write on the stream) and
`ApplyConfig` (the complete, pruned resource set the consumer must translate and apply, then report
back with `apply_result`). Rules followed (xDS protocol, grpc-go and Envoy's subscription state):

- version and nonce differ: the last ACKed version per type survives reconnects, the nonce is per stream;
- an ACK is sent only once the consumer applied the update; its failure becomes the NACK, which echoes the
  new nonce with the *previous* version, and every error of one response is collected into that NACK;
- per resource (Envoy): the consumer reports which resources it rejected (`apply_result(rejected=)`); the
  others are applied, each rejected one keeps its previously accepted version (or stays absent), and the
  NACK of each type names only that type's rejected resources;
- a response for a type URL not subscribed is ignored (logged in `ignored_responses`), as Envoy does;
- LDS and CDS are wildcard; RDS and EDS follow the names the listeners and clusters reference;
- SotW: a listener or cluster absent from a response is deleted; RDS/EDS resources leave with their parents;
- Delta: subscribe/unsubscribe diffs, removed_resources, initial_resource_versions on reconnect;
- warming: an update whose listeners or clusters reference routes or endpoints subscribed to and not
  received yet waits for them (at most `initial_fetch_timeout_s`, once per name), so clusters and
  endpoints become active before their users; a name the server removed, or that timed out, is the
  consumer's business (xds/per_resource.py: the listener is warming, the cluster has no endpoints);
- TTL: a resource with a TTL that is not refreshed (by an update or a heartbeat) in time is removed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import message
from google.rpc import status_pb2

from planemesh.xds.resources import (
    CLUSTER,
    ENDPOINT,
    FULL_STATE_TYPES,
    LISTENER,
    ROUTE,
    SECRET,
    SHORT_NAME,
    TYPE_ORDER,
    ResourceError,
    Wrapped,
    from_delta_resource,
    unwrap_sotw,
)
from planemesh.xds.tls_refs import cluster_secret_names, listener_secret_names

HCM_TYPE = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
INVALID_ARGUMENT = 3  # google.rpc.Code, the status a NACK carries


class Mode(StrEnum):
    SOTW = "sotw"
    DELTA = "delta"


Request = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest
Response = discovery_pb2.DiscoveryResponse | discovery_pb2.DeltaDiscoveryResponse


@dataclass(frozen=True, slots=True)
class XdsResources:
    """What the consumer translates: the current resources of every type, by name."""

    listeners: Mapping[str, listener_pb2.Listener]
    routes: Mapping[str, message.Message]
    clusters: Mapping[str, cluster_pb2.Cluster]
    endpoints: Mapping[str, message.Message]
    versions: Mapping[str, str]  # short type name (LDS...) -> version
    # SDS: the secrets the listeners and clusters name
    secrets: Mapping[str, message.Message] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def version(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.versions.items()) if v)


@dataclass(frozen=True, slots=True)
class SendRequest:
    request: Request


@dataclass(frozen=True, slots=True)
class ApplyConfig:
    token: int
    resources: XdsResources
    accepted: XdsResources | None = None  # what was applied before: a rejected resource falls back to it


Action = SendRequest | ApplyConfig


# ---- which names a resource references (RDS from listeners, EDS from clusters) --------------------


def route_names(listener: listener_pb2.Listener) -> set[str]:
    names: set[str] = set()
    chains = [*listener.filter_chains]
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for flt in chain.filters:
            if flt.typed_config.type_url != HCM_TYPE:
                continue
            hcm = hcm_pb2.HttpConnectionManager()
            try:
                hcm.ParseFromString(flt.typed_config.value)
            except message.DecodeError:
                continue  # translation reports it
            if hcm.HasField("rds") and hcm.rds.route_config_name:
                names.add(hcm.rds.route_config_name)
    return names


def eds_name(cluster: cluster_pb2.Cluster) -> str | None:
    if cluster.WhichOneof("cluster_discovery_type") == "type" and cluster.type == cluster_pb2.Cluster.EDS:
        return cluster.eds_cluster_config.service_name or cluster.name
    return None


def references(type_url: str, resources: Mapping[str, message.Message], child: str | None = None) -> set[str]:
    """Names of dependent resources (RDS for LDS, EDS for CDS; SDS for both when child is SECRET)."""
    out: set[str] = set()
    for msg in resources.values():
        if child == SECRET:  # xds/tls_refs.py
            out |= listener_secret_names(msg) if type_url == LISTENER else cluster_secret_names(msg)  # type: ignore[arg-type]
        elif type_url == LISTENER:
            out |= route_names(msg)  # type: ignore[arg-type]
        elif type_url == CLUSTER and (name := eds_name(msg)) is not None:  # type: ignore[arg-type]
            out.add(name)
    return out


# Secrets have two parents: listeners (DownstreamTlsContext) and clusters (UpstreamTlsContext).
PARENTS_OF = {ROUTE: (LISTENER,), ENDPOINT: (CLUSTER,), SECRET: (LISTENER, CLUSTER)}

# ---- per-type state -------------------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    msg: message.Message
    version: str
    expires_at: float | None = None


@dataclass(slots=True)
class Staged:
    """A received update not yet applied. nonce None: a local change (TTL expiry), never ACKed."""

    nonce: str | None
    version: str
    cache: dict[str, Entry]
    stream: int


@dataclass(slots=True)
class TypeState:
    type_url: str
    wildcard: bool
    version: str = ""  # last ACKed SotW version (Delta: system_version_info); survives reconnects
    nonce: str = ""  # last nonce received on the current stream
    cache: dict[str, Entry] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)  # subscription the server knows (named types)
    awaiting: set[str] = field(default_factory=set)  # subscribed, no response of this type since
    sub_nonce: str = ""  # SotW: the nonce the last subscription change carried
    pending: Staged | None = None
    acks: int = 0
    nacks: int = 0
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class TypeStatus:
    type_url: str
    version: str
    nonce: str
    resources: int
    subscribed: tuple[str, ...]
    acks: int
    nacks: int
    last_error: str | None


class AdsClientState:
    def __init__(
        self,
        node: base_pb2.Node,
        mode: Mode = Mode.SOTW,
        *,
        initial_fetch_timeout_s: float = 15.0,
        types: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET),
        pinned_secrets: frozenset[str] = frozenset(),
    ) -> None:
        self.node = node
        # Secrets subscribed to whatever the listeners and clusters name: those of planes whose SLA requires
        # mTLS (model/planes.py SLA.mtls_cert / mtls_trust); an update waits for them like for a listener's.
        self.pinned_secrets = pinned_secrets
        self.mode = Mode(mode)
        self.initial_fetch_timeout_s = initial_fetch_timeout_s
        self.types = {t: TypeState(t, wildcard=t in FULL_STATE_TYPES) for t in TYPE_ORDER if t in types}
        self._stream = 0  # stream generation; 0: no stream
        self._connected = False
        self._node_sent = False
        self._tokens = itertools.count(1)
        self._inflight: tuple[int, dict[str, Staged]] | None = None
        self._warm_deadline: float | None = None
        self.ignored_responses = 0  # responses for type URLs not subscribed (ignored, as Envoy does)
        self.last_error: str | None = None
        # (type URL, raw resource) -> the decoded one, possibly shared with other streams (agent/workloads/)
        self.decode_hook: Callable[[str, Any, Callable[[Any, str], Wrapped]], Wrapped] | None = None

    # ---- readable state --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def status(self) -> list[TypeStatus]:
        return [
            TypeStatus(
                t.type_url, t.version, t.nonce, len(t.cache), tuple(sorted(t.names)), t.acks, t.nacks, t.last_error
            )
            for t in self.types.values()
        ]

    def next_deadline(self) -> float | None:
        """When `timer_fired` must be called next (TTL expiry, warming timeout), or None."""
        caches = self._candidate().values()  # an expiry already staged for removal is not due again
        times = [e.expires_at for cache in caches for e in cache.values() if e.expires_at is not None]
        if self._warm_deadline is not None:
            times.append(self._warm_deadline)
        return min(times) if times else None

    # ---- events ----------------------------------------------------------------------------------

    def stream_started(self, now: float) -> list[Action]:
        self._stream += 1
        self._connected = True
        self._node_sent = False
        out: list[Action] = []
        for ts in self.types.values():
            ts.nonce = ""
            ts.pending = None
            if not ts.wildcard:
                ts.names = self._desired_names(ts.type_url)
                ts.awaiting = ts.names - set(ts.cache)
                if not ts.names:
                    continue  # never open a named type with an empty list: that would mean wildcard
            out.append(SendRequest(self._initial_request(ts)))
        return out

    def stream_reset(self, now: float) -> list[Action]:
        """The stream is gone: its nonces and unapplied updates die with it; versions and caches stay."""
        self._connected = False
        for ts in self.types.values():
            ts.nonce = ""
            ts.pending = None
        self._warm_deadline = None
        return []

    def response_received(self, resp: Response, now: float) -> list[Action]:
        delta = isinstance(resp, discovery_pb2.DeltaDiscoveryResponse)
        nonce = resp.nonce
        if delta != (self.mode is Mode.DELTA):
            self.ignored_responses += 1  # cannot happen on a real stream: the gRPC method fixes the kind
            self.last_error = f"ignored a {'delta' if delta else 'SotW'} response on a {self.mode} stream"
            return []
        ts = self.types.get(resp.type_url)
        if ts is None:  # Envoy: "Ignoring the message for type URL ... as it has no current subscribers"
            self.ignored_responses += 1
            self.last_error = f"ignored a response for type URL {resp.type_url!r}: not subscribed"
            return []
        ts.nonce = nonce
        errors: list[str] = []
        base = ts.pending.cache if ts.pending is not None else ts.cache
        if delta:
            version = resp.system_version_info
            received = self._decode(ts, [from_delta_resource for _ in resp.resources], resp.resources, errors)
            cache = dict(base)
            for name in resp.removed_resources:
                cache.pop(name, None)
        else:
            version = resp.version_info
            received = self._decode(ts, [unwrap_sotw for _ in resp.resources], resp.resources, errors)
            cache = {} if ts.type_url in FULL_STATE_TYPES else dict(base)
        ts.awaiting -= {item.name for item in received}
        if delta:
            ts.awaiting -= set(resp.removed_resources)  # the server says it does not exist
        for item in received:
            entry_version = item.version or version
            expires = now + item.ttl_s if item.ttl_s else None
            if item.msg is None:  # heartbeat: the resource is unchanged, its TTL refreshed
                old = base.get(item.name)
                if old is not None:
                    cache[item.name] = Entry(old.msg, old.version, expires)
                continue
            cache[item.name] = Entry(item.msg, entry_version, expires)
        if errors:
            return [self._nack(ts, nonce, "; ".join(errors))]
        ts.pending = Staged(nonce, version, cache, self._stream)
        return self._resubscribe() + self._stale_subscription(ts, delta) + self._maybe_apply(now)

    def _stale_subscription(self, ts: TypeState, delta: bool) -> list[Action]:
        """SotW: a response crossed our subscription change (the server pushed it before it read the change, and
        then ignores the change as answering a stale nonce) and lacks names we wait for. Envoy ACKs such a
        response at once with its current names; we ACK only after apply, which waits for those names: without
        this the update would wait out initial_fetch_timeout_s (15 s for 1,000 new clusters, bench/scale.py).
        The names go again with this nonce and the accepted version (not an ACK of the new one)."""
        if delta or not ts.awaiting or ts.type_url not in PARENTS_OF or ts.sub_nonce in ("", ts.nonce):
            return []
        ts.sub_nonce = ts.nonce
        req = discovery_pb2.DiscoveryRequest(
            type_url=ts.type_url, version_info=ts.version, response_nonce=ts.nonce, resource_names=sorted(ts.names)
        )
        return [SendRequest(self._with_node(req))]

    def apply_result(
        self,
        token: int,
        error: Exception | None,
        now: float,
        rejected: Mapping[str, Mapping[str, str]] | None = None,
    ) -> list[Action]:
        """The consumer applied the resources of ApplyConfig `token` (error None), except those in
        `rejected` (type URL -> name -> reason), or refused the whole update (`error`)."""
        if self._inflight is None or self._inflight[0] != token:
            return []
        _, batch = self._inflight
        self._inflight = None
        answers: list[tuple[TypeState, str, str | None]] = []  # (type, nonce, NACK reason)
        rejected = rejected or {}
        for type_url, staged in batch.items():
            ts = self.types[type_url]
            live = staged.nonce is not None and staged.stream == self._stream and self._connected
            current = live and ts.nonce == staged.nonce  # a newer response will be ACKed/NACKed itself
            if error is None:
                bad = rejected.get(type_url, {})
                cache = dict(staged.cache)
                for name in bad:  # a rejected resource keeps its accepted version, or stays absent
                    if name in ts.cache:
                        cache[name] = ts.cache[name]
                    else:
                        cache.pop(name, None)
                ts.cache = cache
                reason = "; ".join(bad[n] for n in sorted(bad)) if bad else None
                if staged.nonce is not None:
                    if reason is None:
                        ts.version = staged.version
                        ts.acks += 1
                        ts.last_error = None
                    else:
                        ts.nacks += 1
                        ts.last_error = reason
                        self.last_error = f"{SHORT_NAME[type_url]}: {reason}"
                if current:
                    answers.append((ts, staged.nonce or "", reason))
                continue
            reason = str(error)
            ts.last_error = reason
            self.last_error = f"{SHORT_NAME[type_url]}: {reason}"
            if staged.nonce is None:
                for entry in ts.cache.values():  # TTL removal refused: do not retry on every tick
                    entry.expires_at = None
                continue
            ts.nacks += 1
            if current:
                answers.append((ts, staged.nonce, reason))
        # Subscriptions first (they drop routes/endpoints no applied parent needs), then the answers:
        # a SotW subscription change already carries the new version and nonce, i.e. it is the ACK.
        out: list[Action] = list(self._resubscribe())
        resent = {a.request.type_url: a.request for a in out if isinstance(a.request, discovery_pb2.DiscoveryRequest)}
        for ts, nonce, reason in answers:
            if ts.type_url in resent:
                if reason is not None:
                    resent[ts.type_url].error_detail.CopyFrom(status_pb2.Status(code=INVALID_ARGUMENT, message=reason))
            elif reason is not None:
                out.append(SendRequest(self._nack_request(ts, nonce, reason)))
            else:
                out.append(SendRequest(self._ack(ts, nonce)))
        return out + self._maybe_apply(now)

    def timer_fired(self, now: float) -> list[Action]:
        for ts in self.types.values():
            source = ts.pending.cache if ts.pending is not None else ts.cache
            expired = [n for n, e in source.items() if e.expires_at is not None and e.expires_at <= now]
            if not expired:
                continue
            cache = {n: e for n, e in source.items() if n not in expired}
            if ts.pending is not None:
                ts.pending.cache = cache
            else:
                ts.pending = Staged(None, ts.version, cache, self._stream)
        return self._maybe_apply(now)

    # ---- internals -------------------------------------------------------------------------------

    def _decode(self, ts: TypeState, decoders: list, resources: list, errors: list[str]) -> list[Wrapped]:
        out: list[Wrapped] = []
        seen: set[str] = set()
        kind = SHORT_NAME[ts.type_url]
        for i, (decode, raw) in enumerate(zip(decoders, resources, strict=True)):
            try:
                hook = self.decode_hook
                item = decode(raw, ts.type_url) if hook is None else hook(ts.type_url, raw, decode)
            except ResourceError as exc:
                errors.append(f"{kind} resource [{i}]: {exc.reason}")
                continue
            if not item.name:
                errors.append(f"{kind} resource [{i}]: has no name")
                continue
            if item.name in seen:
                errors.append(f"{kind} {item.name!r}: duplicate name in one response")
                continue
            seen.add(item.name)
            if not ts.wildcard and item.name not in ts.names:
                continue  # not requested (a server may send more in SotW): ignore, as Envoy does
            out.append(item)
        return out

    def _candidate(self) -> dict[str, dict[str, Entry]]:
        return {t: (ts.pending.cache if ts.pending is not None else ts.cache) for t, ts in self.types.items()}

    def _desired_names(self, type_url: str) -> set[str]:
        """Named types follow every parent version we may still apply: accepted, pending, in flight."""
        parents = [p for p in PARENTS_OF.get(type_url, ()) if p in self.types]
        if not parents:
            return set(self.types[type_url].names)
        names: set[str] = set(self.pinned_secrets) if type_url == SECRET else set()
        for parent in parents:
            pts = self.types[parent]
            sources = [pts.cache]
            if pts.pending is not None:
                sources.append(pts.pending.cache)
            if self._inflight is not None and parent in self._inflight[1]:
                sources.append(self._inflight[1][parent].cache)
            for cache in sources:
                names |= references(parent, {n: e.msg for n, e in cache.items()}, type_url)
        return names

    def _pruned(self, type_url: str, cache: dict[str, Entry]) -> dict[str, Entry]:
        if type_url not in PARENTS_OF:
            return dict(cache)
        wanted = self._desired_names(type_url)
        return {n: e for n, e in cache.items() if n in wanted}

    def _resubscribe(self) -> list[Action]:
        out: list[Action] = []
        for type_url in PARENTS_OF:
            ts = self.types.get(type_url)
            if ts is None:
                continue
            desired = self._desired_names(type_url)
            if desired == ts.names:
                continue
            added, removed = desired - ts.names, ts.names - desired
            ts.names = desired
            ts.awaiting = (ts.awaiting | added) - removed
            for name in removed:
                ts.cache.pop(name, None)
            if not self._connected:
                continue
            if self.mode is Mode.DELTA:
                req = discovery_pb2.DeltaDiscoveryRequest(
                    type_url=type_url,
                    resource_names_subscribe=sorted(added),
                    resource_names_unsubscribe=sorted(removed),
                )
            else:
                req = discovery_pb2.DiscoveryRequest(
                    type_url=type_url, version_info=ts.version, response_nonce=ts.nonce, resource_names=sorted(desired)
                )
                ts.sub_nonce = ts.nonce
            out.append(SendRequest(self._with_node(req)))
        return out

    def _maybe_apply(self, now: float) -> list[Action]:
        if self._inflight is not None:
            return []
        batch = {t: ts.pending for t, ts in self.types.items() if ts.pending is not None}
        if not batch:
            self._warm_deadline = None
            return []
        candidate = self._candidate()
        missing = []
        for type_url, parents in PARENTS_OF.items():
            for parent in parents:
                if type_url in candidate and parent in candidate:
                    wanted = references(parent, {n: e.msg for n, e in candidate[parent].items()}, type_url)
                    if type_url == SECRET:
                        wanted |= self.pinned_secrets
                    missing += sorted((wanted - set(candidate[type_url])) & self.types[type_url].awaiting)
        if missing and any(staged.nonce is not None for staged in batch.values()):
            if self._warm_deadline is None:
                self._warm_deadline = now + self.initial_fetch_timeout_s
            if now < self._warm_deadline:
                return []  # warming: wait for the routes/endpoints the update needs
            for type_url in PARENTS_OF:  # timed out: these are the consumer's to handle (not active yet)
                if type_url in self.types:
                    self.types[type_url].awaiting.clear()
        self._warm_deadline = None
        for ts in self.types.values():
            ts.pending = None
        token = next(self._tokens)
        accepted = self._view({t: ts.cache for t, ts in self.types.items()}, {})
        self._inflight = (token, batch)
        return [ApplyConfig(token, self._view(candidate, batch), accepted)]

    def _view(self, caches: dict[str, dict[str, Entry]], batch: dict[str, Staged]) -> XdsResources:
        views = {t: {n: e.msg for n, e in self._pruned(t, c).items()} for t, c in caches.items()}
        versions = {SHORT_NAME[t]: (batch[t].version if t in batch else self.types[t].version) for t in self.types}
        return XdsResources(
            listeners=MappingProxyType(views.get(LISTENER, {})),
            routes=MappingProxyType(views.get(ROUTE, {})),
            clusters=MappingProxyType(views.get(CLUSTER, {})),
            endpoints=MappingProxyType(views.get(ENDPOINT, {})),
            versions=MappingProxyType(versions),
            secrets=MappingProxyType(views.get(SECRET, {})),
        )

    def _with_node(self, req: Request) -> Request:
        if not self._node_sent:  # the node identity goes on the first request of each stream
            req.node.CopyFrom(self.node)
            self._node_sent = True
        return req

    def _initial_request(self, ts: TypeState) -> Request:
        if self.mode is Mode.DELTA:
            req = discovery_pb2.DeltaDiscoveryRequest(
                type_url=ts.type_url,
                resource_names_subscribe=["*"] if ts.wildcard else sorted(ts.names),
                initial_resource_versions={n: e.version for n, e in ts.cache.items()},
            )
        else:
            req = discovery_pb2.DiscoveryRequest(
                type_url=ts.type_url, version_info=ts.version, resource_names=sorted(ts.names)
            )
        return self._with_node(req)

    def _ack(self, ts: TypeState, nonce: str) -> Request:
        if self.mode is Mode.DELTA:
            return self._with_node(discovery_pb2.DeltaDiscoveryRequest(type_url=ts.type_url, response_nonce=nonce))
        return self._with_node(
            discovery_pb2.DiscoveryRequest(
                type_url=ts.type_url, version_info=ts.version, response_nonce=nonce, resource_names=sorted(ts.names)
            )
        )

    def _nack_request(self, ts: TypeState, nonce: str, reason: str) -> Request:
        req = self._ack(ts, nonce)  # the previous version, the new nonce
        req.error_detail.CopyFrom(status_pb2.Status(code=INVALID_ARGUMENT, message=reason))
        return req

    def _nack(self, ts: TypeState, nonce: str, reason: str) -> Action:
        ts.nacks += 1
        ts.last_error = reason
        self.last_error = f"{SHORT_NAME[ts.type_url]}: {reason}"
        return SendRequest(self._nack_request(ts, nonce, reason))
