"""The HBONE node's table from istio's WDS (Address, Authorization), and its ADS subscription, without I/O.

What a resource gives (xds/istio_wds.py for the messages):
- a Workload on this node (`node` = our `wds.node`): its addresses are local pods, with the identity
  spiffe://<trust_domain|cluster.local>/ns/<namespace>/sa/<service_account|default> and its selector policies;
- a Workload on a peer node (`node` = a peer's `name` in the settings) with `tunnel_protocol: HBONE`: each of its
  addresses is a /32 (/128) route to that peer (the peer's HBONE address stays in the settings: WDS carries no
  node addresses);
- an Authorization: a policy (agent/hbone/authz.py).
Workloads of other nodes, without HBONE, without addresses, and Services are not HBONE's business (kept, unused).

Refused, each naming the resource and field (the NACK's error_detail): an address that is not 4 or 16 bytes; a
local workload without a namespace; a workload with a waypoint (its traffic must go through the waypoint: not
supported); an Authorization with `source_ips` (the source pod's address is not authenticated over HBONE) or
any field planemesh does not read (unknown to us: ignoring it could widen an ALLOW). As Envoy does per resource,
the other resources of the response are applied and a refused one keeps its last accepted version (or stays
absent); the NACK carries the previous version of the type.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import message
from google.protobuf.unknown_fields import UnknownFieldSet
from google.rpc import status_pb2

from planemesh.agent.hbone.authz import GLOBAL, Authz, Destination, Match, Policy, StrMatch
from planemesh.agent.hbone.routes import Network, Peer, Routes
from planemesh.xds import istio_wds
from planemesh.xds.istio_wds import ADDRESS_TYPE, AUTHORIZATION_TYPE

TYPES = (ADDRESS_TYPE, AUTHORIZATION_TYPE)
INVALID_ARGUMENT = 3
_SCOPES = {0: GLOBAL, 1: "NAMESPACE", 2: "WORKLOAD_SELECTOR"}


class WdsError(ValueError):
    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class LocalPod:
    identity: str
    dst: Destination


@dataclass(frozen=True, slots=True)
class Entry:
    """One accepted Address: the pods it puts on this node, or the routes it adds to a peer."""

    local: Mapping[str, LocalPod] = field(default_factory=dict)
    peer: str | None = None
    routes: tuple[Network, ...] = ()


def _ip(raw: bytes, where: str) -> str:
    if len(raw) not in (4, 16):
        raise WdsError(where, f"{len(raw)} bytes, not an IPv4/IPv6 address")
    return str(ipaddress.ip_address(raw))


def address_entry(name: str, msg: message.Message, node: str, peers: frozenset[str]) -> Entry:
    where = f"Address {name!r}"
    if msg.WhichOneof("type") != "workload":  # type: ignore[attr-defined]
        return Entry()
    w = msg.workload  # type: ignore[attr-defined]
    ips = [_ip(a, f"{where}: workload.addresses[{i}]") for i, a in enumerate(w.addresses)]
    if w.HasField("waypoint") and w.node in {node, *peers}:
        raise WdsError(f"{where}: workload.waypoint", "not supported: its traffic must go through its waypoint")
    if w.node == node and node:
        if not w.namespace:
            raise WdsError(f"{where}: workload.namespace", "empty (the workload's identity needs it)")
        identity = (f"spiffe://{w.trust_domain or 'cluster.local'}/ns/{w.namespace}/sa/"
                    f"{w.service_account or 'default'}")  # fmt: skip
        dst = Destination(w.namespace, frozenset(w.authorization_policies))
        return Entry(local={ip: LocalPod(identity, dst) for ip in ips})
    if w.node in peers and w.tunnel_protocol == istio_wds.HBONE:
        return Entry(peer=w.node, routes=tuple(ipaddress.ip_network(ip) for ip in ips))
    return Entry()


def _unknown(msg: message.Message, where: str) -> None:
    """Refuse fields planemesh does not read, at any depth."""
    if len(UnknownFieldSet(msg)):
        raise WdsError(where, "carries fields planemesh does not read (a newer istio API?)")
    for fd, value in msg.ListFields():
        if fd.type == fd.TYPE_MESSAGE:
            many = _repeated(fd)
            for i, sub in enumerate(value if many else [value]):
                _unknown(sub, f"{where}.{fd.name}[{i}]" if many else f"{where}.{fd.name}")


def _repeated(fd) -> bool:  # type: ignore[no-untyped-def]
    """protobuf >= 6 has `is_repeated`; older ones only `label`."""
    flag = getattr(fd, "is_repeated", None)
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


def _str_match(m: message.Message) -> StrMatch:
    kind = m.WhichOneof("match_type") or "presence"  # type: ignore[attr-defined]
    return StrMatch(kind, "" if kind == "presence" else getattr(m, kind))


def _net(a: message.Message, where: str) -> Network:
    ip = _ip(a.address, f"{where}.address")  # type: ignore[attr-defined]
    try:
        return ipaddress.ip_network(f"{ip}/{a.length}", strict=False)  # type: ignore[attr-defined]
    except ValueError as exc:
        raise WdsError(f"{where}.length", str(exc)) from None


def _match(m: message.Message, where: str) -> Match:
    for name in ("source_ips", "not_source_ips"):
        if len(getattr(m, name)):
            raise WdsError(f"{where}.{name}", "not supported: the source pod's address is not authenticated over HBONE")
    nets = {n: tuple(_net(a, f"{where}.{n}[{i}]") for i, a in enumerate(getattr(m, n)))
            for n in ("destination_ips", "not_destination_ips")}  # fmt: skip
    return Match(
        tuple(map(_str_match, m.namespaces)), tuple(map(_str_match, m.not_namespaces)),  # type: ignore[attr-defined]
        tuple(map(_str_match, m.principals)), tuple(map(_str_match, m.not_principals)),  # type: ignore[attr-defined]
        nets["destination_ips"], nets["not_destination_ips"],
        tuple(m.destination_ports), tuple(m.not_destination_ports),  # type: ignore[attr-defined]
    )  # fmt: skip


def authorization_policy(name: str, msg: message.Message) -> Policy:
    where = f"Authorization {name!r}"
    _unknown(msg, where)
    if msg.scope not in _SCOPES:  # type: ignore[attr-defined]
        raise WdsError(f"{where}: scope", f"unknown scope {msg.scope}")  # type: ignore[attr-defined]
    if msg.action not in (0, 1):  # type: ignore[attr-defined]
        raise WdsError(f"{where}: action", f"unknown action {msg.action} (ALLOW and DENY only)")  # type: ignore[attr-defined]
    rules = tuple(
        tuple(tuple(_match(m, f"{where}: rules[{r}].clauses[{c}].matches[{k}]") for k, m in enumerate(clause.matches))
              for c, clause in enumerate(rule.clauses))
        for r, rule in enumerate(msg.rules)  # type: ignore[attr-defined]
    )  # fmt: skip
    return Policy(name, msg.namespace, _SCOPES[msg.scope], "DENY" if msg.action else "ALLOW", rules)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Table:
    routes: Routes
    authz: Authz


def build_table(static: Routes, entries: Mapping[str, Entry], policies: Mapping[str, Policy]) -> Table:
    """The static settings plus what WDS gave: local pods (identity), /32 routes per peer, policies."""
    workloads = dict(static.workloads)
    extra: dict[str, list[Network]] = {}
    destinations: dict[str, Destination] = {}
    for entry in entries.values():
        for ip, pod in entry.local.items():
            workloads[ip] = pod.identity
            destinations[ip] = pod.dst
        if entry.peer is not None:
            extra.setdefault(entry.peer, []).extend(entry.routes)
    peers = tuple(
        Peer(p.name, p.address, tuple(dict.fromkeys([*p.cidrs, *extra.get(p.name, [])])), p.identity)
        for p in static.peers
    )
    return Table(Routes(workloads, peers), Authz(tuple(policies[k] for k in sorted(policies)), destinations))


class WdsState:
    """The ADS subscription to the two WDS types (SotW, wildcard): requests out, responses in, the table."""

    def __init__(self, node_id: str, node: str, static: Routes) -> None:
        self.node_pb = base_pb2.Node(id=node_id)
        self.node = node
        self.static = static
        self._peers = frozenset(p.name for p in static.peers)
        self.versions: dict[str, str] = dict.fromkeys(TYPES, "")
        self.entries: dict[str, Entry] = {}
        self.policies: dict[str, Policy] = {}
        self.table = build_table(static, {}, {})
        self.acks = self.nacks = 0
        self.last_error = ""

    def initial_requests(self) -> list[discovery_pb2.DiscoveryRequest]:
        """On every (re)connect: subscribe to both types, with the versions we hold."""
        return [discovery_pb2.DiscoveryRequest(node=self.node_pb, type_url=t, version_info=self.versions[t])
                for t in TYPES]  # fmt: skip

    def on_response(self, resp: discovery_pb2.DiscoveryResponse) -> tuple[discovery_pb2.DiscoveryRequest, bool]:
        """(the ACK or NACK to send, whether the table changed)."""
        req = discovery_pb2.DiscoveryRequest(node=self.node_pb, type_url=resp.type_url, response_nonce=resp.nonce)
        if resp.type_url not in TYPES:
            req.version_info = ""
            return req, False
        errors: list[str] = []
        if resp.type_url == ADDRESS_TYPE:
            changed = self._take(resp, self.entries, lambda n, m: address_entry(n, m, self.node, self._peers), errors)
        else:
            changed = self._take(resp, self.policies, authorization_policy, errors)
        if changed:
            self.table = build_table(self.static, self.entries, self.policies)
        if errors:
            self.nacks += 1
            self.last_error = "; ".join(errors)
            req.version_info = self.versions[resp.type_url]
            req.error_detail.CopyFrom(status_pb2.Status(code=INVALID_ARGUMENT, message=self.last_error))
        else:
            self.acks += 1
            self.versions[resp.type_url] = req.version_info = resp.version_info
        return req, changed

    def _take(self, resp, held: dict, parse, errors: list[str]) -> bool:  # type: ignore[no-untyped-def]
        cls = istio_wds.Address if resp.type_url == ADDRESS_TYPE else istio_wds.Authorization
        fresh: dict = {}
        for i, packed in enumerate(resp.resources):
            msg = cls()
            name = f"resources[{i}]"
            try:
                if packed.type_url != resp.type_url:
                    raise WdsError(name, f"type {packed.type_url!r} in a {resp.type_url} response")
                msg.ParseFromString(packed.value)
                name = istio_wds.RESOURCE_NAMES[msg.DESCRIPTOR.full_name](msg) or name
                fresh[name] = parse(name, msg)
            except (WdsError, message.DecodeError, ValueError) as exc:
                errors.append(str(exc))
                if name in held:
                    fresh[name] = held[name]  # the last accepted version stays
        changed = fresh != held
        held.clear()
        held.update(fresh)
        return changed
