"""Authorization: Envoy's RBAC (envoy.filters.http.rbac), what Istio's AuthorizationPolicy compiles to. Pure.

    decision = evaluate(rbac_filter, request)   # -> (allowed, matched policy name or None)

A filter has an action (ALLOW: a request passes only if some policy matches; DENY: it is refused if some policy
matches) and named policies; a policy matches when any of its permissions and any of its principals match.
Permissions and principals are trees of rules (and / or / not, any) over the request: headers (`:method`,
`:path`, `:authority` included), URL path, destination port and address; principals also the peer's
authenticated identity (its SPIFFE ID; none on plaintext) and source address.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from planemesh.model.config import HeaderMatch
from planemesh.model.ip import IPAddress, IPNetwork
from planemesh.model.tls_config import SanMatch as StringMatch


@dataclass(frozen=True, slots=True)
class Rule:
    """One node: kind any | and | or | not | header | path | dst_port | dst_ip | authenticated | source_ip | plane."""

    kind: str
    children: tuple[Rule, ...] = ()
    header: HeaderMatch | None = None
    string: StringMatch | None = None  # path, plane, authenticated principal_name (None: any authenticated peer)
    port: int = 0
    cidr: IPNetwork | None = None


@dataclass(frozen=True, slots=True)
class RbacPolicy:
    name: str
    permissions: tuple[Rule, ...]
    principals: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class RbacFilter:
    action: str  # "allow" | "deny"
    policies: tuple[RbacPolicy, ...] = field(default=())


@dataclass(slots=True)
class RequestFacts:
    headers: Mapping[str, str]  # lower-case names, with :method, :path (no query), :authority
    path: str
    dst_ip: str
    dst_port: int
    src_ip: str
    peer: str | None  # the client certificate's SPIFFE ID (mTLS), else None
    plane: str = ""  # the plane the connection arrived on (the client's)


def _header_matches(spec: HeaderMatch, headers: Mapping[str, str]) -> bool:
    value = headers.get(spec.name)
    if spec.present is not None:
        ok = (value is not None) == spec.present
    elif value is None:
        ok = False
    elif spec.exact is not None:
        ok = value == spec.exact
    elif spec.prefix is not None:
        ok = value.startswith(spec.prefix)
    else:  # regex header matchers are refused at translation (xds/translate_rbac.py)
        ok = True
    return ok != spec.invert


def _in(cidr: IPNetwork | None, address: str) -> bool:
    if cidr is None or not address:
        return False
    try:
        ip = IPAddress(address.split("%", 1)[0])
    except (ValueError, TypeError):
        return False
    if ip.version == 6 and ip.is_ipv4_mapped():
        ip = ip.ipv4()
    return ip.version == cidr.version and ip in cidr


def matches(rule: Rule, req: RequestFacts) -> bool:
    kind = rule.kind
    if kind == "any":
        return True
    if kind == "and":
        return all(matches(r, req) for r in rule.children)
    if kind == "or":
        return any(matches(r, req) for r in rule.children)
    if kind == "not":
        return not matches(rule.children[0], req)
    if kind == "header":
        return rule.header is not None and _header_matches(rule.header, req.headers)
    if kind == "path":
        return rule.string is not None and rule.string.matches(req.path)
    if kind == "dst_port":
        return req.dst_port == rule.port
    if kind == "dst_ip":
        return _in(rule.cidr, req.dst_ip)
    if kind == "source_ip":
        return _in(rule.cidr, req.src_ip)
    if kind == "plane":
        return rule.string is not None and rule.string.matches(req.plane)
    if kind == "authenticated":
        if req.peer is None:
            return False
        return rule.string is None or rule.string.matches(req.peer)
    return False  # unknown kinds never come out of translation


def evaluate(rbac: RbacFilter, req: RequestFacts) -> tuple[bool, str | None]:
    """(allowed, the policy that matched)."""
    for policy in rbac.policies:
        if any(matches(p, req) for p in policy.permissions) and any(matches(p, req) for p in policy.principals):
            return rbac.action == "allow", policy.name
    return rbac.action != "allow", None
