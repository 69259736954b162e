"""envoy.filters.http.rbac and envoy.filters.network.rbac -> agent/rbac.py's model. Pure; unsupported fields
are refused by name.

Supported: action ALLOW / DENY; permissions any, and_rules, or_rules, not_rule, header (exact, prefix,
present, string_match exact/prefix; `:method`, `:path`, `:authority` too), url_path (path exact / prefix /
suffix / contains), destination_port, destination_ip; principals any, and_ids, or_ids, not_id,
authenticated (principal_name against the peer's SPIFFE ID), source_ip / direct_remote_ip / remote_ip (the
TCP peer: planemesh trusts no forwarded address), header. Refused: shadow rules, matchers (xDS matching API),
conditions (CEL), metadata, regex matchers, LOG action.
Both: principal `filter_state` with key `planemesh.plane` (the plane the connection arrived on, i.e. the
client's plane; string_match exact/prefix/...), planemesh's way to name a plane in a policy.
Network RBAC (tcp_proxy chains, what Istio's AuthorizationPolicy compiles to for TCP): the same rules
without `header` / `url_path` (a TCP connection has none), checked once when the connection is accepted
(`enforcement_type` ONE_TIME_ON_FIRST_BYTE; CONTINUOUS is refused: it re-checks dynamic metadata that
planemesh never sets), `delay_deny` refused.
"""

from __future__ import annotations

from envoy.config.rbac.v3 import rbac_pb2 as rbac_cfg
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2

from planemesh.agent.rbac import RbacFilter, RbacPolicy, Rule
from planemesh.model.config import ConfigError
from planemesh.model.ip import AddrFormatError, IPNetwork
from planemesh.model.tls_config import SanMatch as StringMatch
from planemesh.xds.translate_common import only
from planemesh.xds.translate_routes import _header_match

RBAC = "envoy.extensions.filters.http.rbac.v3.RBAC"
NETWORK_RBAC = "envoy.extensions.filters.network.rbac.v3.RBAC"
PLANE_KEY = "planemesh.plane"  # filter_state key naming the connection's plane
_NO_HTTP = "a TCP connection has no HTTP headers or path (envoy.filters.http.rbac has)"
_STRING = ("exact", "prefix", "suffix", "contains")


def _string(sm, path: str) -> StringMatch:
    only(sm, _STRING, path)
    kind = sm.WhichOneof("match_pattern")
    if kind not in _STRING:
        raise ConfigError(path, "exact, prefix, suffix or contains (regex is not supported in RBAC)")
    return StringMatch("any", **{kind: getattr(sm, kind)})


def _cidr(cr, path: str) -> IPNetwork:
    only(cr, {"address_prefix", "prefix_len"}, path)
    try:
        ip = IPNetwork(cr.address_prefix)
    except (AddrFormatError, ValueError):
        raise ConfigError(f"{path}.address_prefix", f"{cr.address_prefix!r} is not an IP address") from None
    length = cr.prefix_len.value if cr.HasField("prefix_len") else ip.prefixlen
    if length > (32 if ip.version == 4 else 128):
        raise ConfigError(f"{path}.prefix_len", f"{length} is too long")
    return IPNetwork(f"{ip.ip}/{length}").cidr


def _header(hm, path: str) -> Rule:
    spec = _header_match(hm, path)
    if spec.regex is not None:
        raise ConfigError(path, "regex (and suffix/contains) header matchers are not supported in RBAC")
    return Rule("header", header=spec)


def _permission(p, path: str, network: bool = False) -> Rule:
    kind = p.WhichOneof("rule")
    if network and kind in ("header", "url_path"):
        raise ConfigError(f"{path}.{kind}", _NO_HTTP)
    if kind == "any" and p.any:
        return Rule("any")
    if kind in ("and_rules", "or_rules"):
        rules = getattr(p, kind).rules
        return Rule(
            kind[:-6] or "and",
            tuple(_permission(r, f"{path}.{kind}.rules[{i}]", network) for i, r in enumerate(rules)),
        )
    if kind == "not_rule":
        return Rule("not", (_permission(p.not_rule, f"{path}.not_rule", network),))
    if kind == "header":
        return _header(p.header, f"{path}.header")
    if kind == "url_path":
        only(p.url_path, {"path"}, f"{path}.url_path")
        return Rule("path", string=_string(p.url_path.path, f"{path}.url_path.path"))
    if kind == "destination_port":
        return Rule("dst_port", port=p.destination_port)
    if kind == "destination_ip":
        return Rule("dst_ip", cidr=_cidr(p.destination_ip, f"{path}.destination_ip"))
    raise ConfigError(f"{path}.{kind or 'rule'}", "not supported by planemesh's RBAC")


def _principal(p, path: str, network: bool = False) -> Rule:
    kind = p.WhichOneof("identifier")
    if network and kind in ("header", "url_path"):
        raise ConfigError(f"{path}.{kind}", _NO_HTTP)
    if kind == "any" and p.any:
        return Rule("any")
    if kind in ("and_ids", "or_ids"):
        ids = getattr(p, kind).ids
        return Rule(kind[:-4], tuple(_principal(r, f"{path}.{kind}.ids[{i}]", network) for i, r in enumerate(ids)))
    if kind == "not_id":
        return Rule("not", (_principal(p.not_id, f"{path}.not_id", network),))
    if kind == "filter_state":
        fs = p.filter_state
        only(fs, {"key", "string_match"}, f"{path}.filter_state")
        if fs.key != PLANE_KEY:
            raise ConfigError(f"{path}.filter_state.key", f"{fs.key!r}: only {PLANE_KEY!r} (the connection's plane)")
        return Rule("plane", string=_string(fs.string_match, f"{path}.filter_state.string_match"))
    if kind == "authenticated":
        only(p.authenticated, {"principal_name"}, f"{path}.authenticated")
        name = p.authenticated.principal_name
        matcher = (
            _string(name, f"{path}.authenticated.principal_name")
            if p.authenticated.HasField("principal_name")
            else None
        )
        return Rule("authenticated", string=matcher)
    if kind in ("source_ip", "direct_remote_ip", "remote_ip"):
        return Rule("source_ip", cidr=_cidr(getattr(p, kind), f"{path}.{kind}"))
    if kind == "header":
        return _header(p.header, f"{path}.header")
    if kind == "url_path":
        only(p.url_path, {"path"}, f"{path}.url_path")
        return Rule("path", string=_string(p.url_path.path, f"{path}.url_path.path"))
    raise ConfigError(f"{path}.{kind or 'identifier'}", "not supported by planemesh's RBAC")


def translate_rbac(typed_config, path: str) -> RbacFilter | None:
    """An RBAC HTTP filter; None when it has no rules (Envoy: no enforcement)."""
    cfg = rbac_pb2.RBAC()
    typed_config.Unpack(cfg)
    only(cfg, {"rules", "rules_stat_prefix", "track_per_rule_stats"}, path)
    if not cfg.HasField("rules"):
        return None
    return _rules(cfg.rules, path, network=False)


def translate_network_rbac(typed_config, path: str) -> RbacFilter | None:
    """An envoy.filters.network.rbac filter of a tcp_proxy chain; None when it has no rules (shadow only)."""
    cfg = net_rbac_pb2.RBAC()
    typed_config.Unpack(cfg)
    only(cfg, {"rules", "stat_prefix", "shadow_rules", "shadow_rules_stat_prefix", "enforcement_type"}, path)
    if cfg.enforcement_type != net_rbac_pb2.RBAC.ONE_TIME_ON_FIRST_BYTE:
        raise ConfigError(f"{path}.enforcement_type", "CONTINUOUS is not supported (checked once per connection)")
    if not cfg.HasField("rules"):
        return None
    return _rules(cfg.rules, path, network=True)


def _rules(rules, path: str, network: bool) -> RbacFilter:
    only(rules, {"action", "policies"}, f"{path}.rules")
    if rules.action not in (rbac_cfg.RBAC.ALLOW, rbac_cfg.RBAC.DENY):
        raise ConfigError(f"{path}.rules.action", "LOG is not supported")
    policies = []
    for name in sorted(rules.policies):
        pol = rules.policies[name]
        ppath = f"{path}.rules.policies[{name}]"
        only(pol, {"permissions", "principals"}, ppath)
        if not pol.permissions or not pol.principals:
            raise ConfigError(ppath, "a policy needs permissions and principals")
        perms = tuple(_permission(p, f"{ppath}.permissions[{i}]", network) for i, p in enumerate(pol.permissions))
        principals = tuple(_principal(p, f"{ppath}.principals[{i}]", network) for i, p in enumerate(pol.principals))
        policies.append(RbacPolicy(name, perms, principals))
    return RbacFilter("allow" if rules.action == rbac_cfg.RBAC.ALLOW else "deny", tuple(policies))
