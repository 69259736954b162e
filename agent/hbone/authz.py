"""istio's L4 authorization as ztunnel enforces it (`istio.security.Authorization` from WDS), without I/O.

A policy applies to a destination workload by its scope: GLOBAL (every workload), NAMESPACE (the workloads of
its namespace), WORKLOAD_SELECTOR (the workloads that list it in `authorization_policies`). Then, as ztunnel
(and Envoy's RBAC pair istiod makes for sidecars): a matching DENY refuses; else, when ALLOW policies apply, one
must match; else the connection is allowed. A policy matches when one of its rules does; a rule when all its
clauses do; a clause when one of its matches does; a match when each of its fields holds (a field's values
are OR-ed, its `not_` values must all fail; an empty match holds). A policy without rules matches nothing.
Principals are the source identity without `spiffe://` (`td/ns/x/sa/y`, as AuthorizationPolicy writes them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from planemesh.agent.hbone.routes import Network

ALLOW, DENY = "ALLOW", "DENY"
GLOBAL, NAMESPACE, WORKLOAD_SELECTOR = "GLOBAL", "NAMESPACE", "WORKLOAD_SELECTOR"
SPIFFE = "spiffe://"


@dataclass(frozen=True, slots=True)
class StrMatch:
    kind: str  # exact | prefix | suffix | presence
    value: str = ""

    def matches(self, text: str) -> bool:
        if self.kind == "exact":
            return text == self.value
        if self.kind == "prefix":
            return text.startswith(self.value)
        if self.kind == "suffix":
            return text.endswith(self.value)
        return text != ""  # presence


@dataclass(frozen=True, slots=True)
class Match:
    namespaces: tuple[StrMatch, ...] = ()
    not_namespaces: tuple[StrMatch, ...] = ()
    principals: tuple[StrMatch, ...] = ()
    not_principals: tuple[StrMatch, ...] = ()
    destination_ips: tuple[Network, ...] = ()
    not_destination_ips: tuple[Network, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def holds(self, conn: Connection) -> bool:
        return (
            _field(self.namespaces, self.not_namespaces, lambda m: m.matches(conn.source_namespace))
            and _field(self.principals, self.not_principals, lambda m: m.matches(conn.principal))
            and _field(self.destination_ips, self.not_destination_ips, lambda n: conn.dst_addr in n)
            and _field(self.destination_ports, self.not_destination_ports, lambda p: p == conn.dst_port)
        )


def _field(values: tuple, negated: tuple, test) -> bool:  # type: ignore[no-untyped-def]
    return (not values or any(test(v) for v in values)) and not any(test(v) for v in negated)


@dataclass(frozen=True, slots=True)
class Policy:
    key: str  # namespace/name, as workloads list it
    namespace: str
    scope: str
    action: str
    rules: tuple[tuple[tuple[Match, ...], ...], ...] = ()  # rules (OR) of clauses (AND) of matches (OR)

    def matches(self, conn: Connection) -> bool:
        return any(all(any(m.holds(conn) for m in clause) for clause in rule) for rule in self.rules)

    def applies_to(self, dst: Destination) -> bool:
        if self.scope == GLOBAL:
            return True
        if self.scope == NAMESPACE:
            return dst.namespace == self.namespace
        return self.key in dst.policies


@dataclass(frozen=True, slots=True)
class Destination:
    """A local workload as authorization sees it."""

    namespace: str
    policies: frozenset[str] = field(default_factory=frozenset)  # its WORKLOAD_SELECTOR policies (ns/name)


@dataclass(frozen=True, slots=True)
class Connection:
    principal: str  # the source identity without spiffe://
    source_namespace: str
    dst_addr: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst_port: int


def connection(identity: str, dst_ip: str, dst_port: int) -> Connection:
    """The facts of one CONNECT: `identity` is the source's SPIFFE ID (spiffe://td/ns/<ns>/sa/<sa>)."""
    principal = identity[len(SPIFFE):] if identity.startswith(SPIFFE) else identity
    parts = principal.split("/")
    namespace = parts[2] if len(parts) >= 5 and parts[1] == "ns" else ""
    return Connection(principal, namespace, ipaddress.ip_address(dst_ip), dst_port)


def authorize(policies: Iterable[Policy], dst: Destination, conn: Connection) -> tuple[bool, str | None]:
    """(allowed, the deciding policy's key or a reason) for one connection to `dst`."""
    applicable = [p for p in policies if p.applies_to(dst)]
    for policy in applicable:
        if policy.action == DENY and policy.matches(conn):
            return False, policy.key
    allows = [p for p in applicable if p.action == ALLOW]
    if not allows:
        return True, None
    for policy in allows:
        if policy.matches(conn):
            return True, policy.key
    return False, "no ALLOW policy matched"


@dataclass(frozen=True, slots=True)
class Authz:
    """The WDS authorization table: policies and the destinations they can apply to (local pod ip -> it)."""

    policies: tuple[Policy, ...] = ()
    destinations: Mapping[str, Destination] = field(default_factory=dict)

    def check(self, identity: str, dst_ip: str, dst_port: int) -> tuple[bool, str | None]:
        dst = self.destinations.get(dst_ip)
        if dst is None:  # a local pod not known from WDS (the static `workloads`): no WDS policy names it
            dst = Destination(namespace="")
            policies: Iterable[Policy] = [p for p in self.policies if p.scope == GLOBAL]
        else:
            policies = self.policies
        return authorize(policies, dst, connection(identity, dst_ip, dst_port))
