"""envoy.filters.http.rbac (RBAC) -> agent/rbac.py's model. Pure; unsupported fields are refused by name.

Supported: action ALLOW / DENY; permissions any, and_rules, or_rules, not_rule, header (exact, prefix,
present, string_match exact/prefix; `:method`, `:path`, `:authority` too), url_path (path exact / prefix /
suffix / contains), destination_port, destination_ip; principals any, and_ids, or_ids, not_id,
authenticated (principal_name against the peer's SPIFFE ID), source_ip / direct_remote_ip / remote_ip (the
TCP peer: planemesh trusts no forwarded address), header. Refused: shadow rules, matchers (xDS matching API),
conditions (CEL), metadata, regex matchers, LOG action.
"""

from __future__ import annotations

from envoy.config.rbac.v3 import rbac_pb2 as rbac_cfg
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from netaddr import AddrFormatError, IPNetwork

from planemesh.agent.rbac import RbacFilter, RbacPolicy, Rule
from planemesh.model.config import ConfigError
from planemesh.model.tls_config import SanMatch as StringMatch
from planemesh.xds.translate_common import only
from planemesh.xds.translate_routes import _header_match

RBAC = "envoy.extensions.filters.http.rbac.v3.RBAC"
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


def _permission(p, path: str) -> Rule:
    kind = p.WhichOneof("rule")
    if kind == "any" and p.any:
        return Rule("any")
    if kind in ("and_rules", "or_rules"):
        rules = getattr(p, kind).rules
        return Rule(kind[:-6] or "and", tuple(_permission(r, f"{path}.{kind}.rules[{i}]") for i, r in enumerate(rules)))
    if kind == "not_rule":
        return Rule("not", (_permission(p.not_rule, f"{path}.not_rule"),))
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


def _principal(p, path: str) -> Rule:
    kind = p.WhichOneof("identifier")
    if kind == "any" and p.any:
        return Rule("any")
    if kind in ("and_ids", "or_ids"):
        ids = getattr(p, kind).ids
        return Rule(kind[:-4], tuple(_principal(r, f"{path}.{kind}.ids[{i}]") for i, r in enumerate(ids)))
    if kind == "not_id":
        return Rule("not", (_principal(p.not_id, f"{path}.not_id"),))
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
    rules = cfg.rules
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
        perms = tuple(_permission(p, f"{ppath}.permissions[{i}]") for i, p in enumerate(pol.permissions))
        principals = tuple(_principal(p, f"{ppath}.principals[{i}]") for i, p in enumerate(pol.principals))
        policies.append(RbacPolicy(name, perms, principals))
    return RbacFilter("allow" if rules.action == rbac_cfg.RBAC.ALLOW else "deny", tuple(policies))
