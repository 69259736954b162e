"""RouteConfiguration (RDS or inline in an HTTP connection manager) -> planemesh RouteConfig."""

from __future__ import annotations

import hashlib
import re

from planemesh.model.config import (
    ConfigError,
    DirectResponse,
    FaultFilter,
    HashPolicy,
    HeaderMatch,
    HeaderValue,
    LocalRateLimit,
    Mirror,
    QueryMatch,
    Redirect,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfig,
    RouteMatch,
    UpgradeConfig,
    VirtualHost,
    WeightedCluster,
)
from planemesh.model.safe_regex import check_config_regex, literal
from planemesh.xds.translate_common import fraction, note_ignored, only, opt_seconds, seconds, uint
from planemesh.xds.translate_filters import per_route_filter

# Fields dropped on purpose: names, stats, metadata and tracing decorations change no forwarding.
_HARMLESS = {"name", "metadata", "decorator", "stat_prefix"}
_RETRY_ON = {"5xx", "gateway-error", "connect-failure", "reset", "retriable-status-codes"}
_RETRY_ALIASES = {"refused-stream": "reset"}  # a refused stream is a reset before any response
# gRPC retry conditions (grpc-status of a trailers-only response): planemesh does not retry on them, so a
# failed gRPC call is returned at once; istiod's default retry_on carries unavailable and cancelled.
_RETRY_GRPC = {"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"}
# Accepted without effect (docs/istio-conformance.md): field -> why dropping it is safe.
_ACTION_IGNORED = {
    "max_stream_duration": (
        "istiod sets 0s (no limit; grpc-timeout headers unbounded): planemesh applies the route timeout only, "
        "a gRPC client still cancels at its own deadline"
    ),
    "max_grpc_timeout": "deprecated grpc-timeout cap; 0s means unbounded, as planemesh behaves",
    "grpc_timeout_offset": "grpc-timeout adjustment; planemesh does not derive timeouts from grpc-timeout",
}
_RETRY_IGNORED = {
    "retry_host_predicate": (
        "previous_hosts: a retry may pick the same endpoint again; the number of attempts is unchanged"
    ),
    "host_selection_retry_max_attempts": "goes with retry_host_predicate",
}
_VHOST_IGNORED = {
    "include_request_attempt_count": "adds x-envoy-attempt-count for the upstream's information only",
    "include_attempt_count_in_response": "adds x-envoy-attempt-count to responses for information only",
}
_RC_IGNORED = {
    "ignore_port_in_host_matching": (
        "planemesh matches the authority as sent, then without its port: a name without port still matches"
    ),
    "max_direct_response_body_size_bytes": "a bound on configured bodies, checked by the control plane",
}
_REDIRECT_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}
# An Upgrade protocol name (RFC 9110 token, with an optional "/version").
_UPGRADE_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(/[!#$%&'*+.^_`|~0-9A-Za-z-]+)?")
_TERMINATE_CONNECT = (
    "planemesh terminates CONNECT: a connect_matcher route needs upgrade_configs "
    "[{upgrade_type: CONNECT, connect_config: {}}] (proxying CONNECT to the upstream is not supported)"
)


def translate_upgrades(configs, path: str, *, route_level: bool) -> tuple[UpgradeConfig, ...]:
    """HCM or RouteAction upgrade_configs -> UpgradeConfig (type lower-case, "connect" for CONNECT).
    Upgrades are byte tunnels after the upstream's 101 (CONNECT: after the proxy's 200); custom upgrade filter
    chains are not supported, nor h2c (never a tunnel: h2c upgrade requests are forwarded as plain requests)."""
    out: dict[str, UpgradeConfig] = {}
    for i, uc in enumerate(configs):
        upath = f"{path}[{i}]"
        only(uc, {"upgrade_type", "enabled", "connect_config"} if route_level else {"upgrade_type", "enabled"}, upath)
        kind = uc.upgrade_type.strip().lower()
        if not _UPGRADE_TOKEN.fullmatch(kind):
            raise ConfigError(f"{upath}.upgrade_type", f"{uc.upgrade_type!r} is not an upgrade protocol name")
        if kind == "h2c":
            raise ConfigError(f"{upath}.upgrade_type", "h2c upgrades are not tunneled (use h2c prior knowledge)")
        if kind in out:
            raise ConfigError(f"{upath}.upgrade_type", f"{uc.upgrade_type!r} is configured twice")
        if route_level and uc.HasField("connect_config"):
            if kind != "connect":
                raise ConfigError(f"{upath}.connect_config", "only for upgrade_type CONNECT")
            only(uc.connect_config, set(), f"{upath}.connect_config")
        out[kind] = UpgradeConfig(kind, uc.enabled.value if uc.HasField("enabled") else True)
    return tuple(out.values())


def _string_match(sm, path: str) -> dict:
    """envoy.type.matcher.v3.StringMatcher -> exact/prefix/regex (suffix and contains become regexes)."""
    only(sm, {"exact", "prefix", "suffix", "contains", "safe_regex"}, path)
    kind = sm.WhichOneof("match_pattern")
    if kind == "exact":
        return {"exact": sm.exact}
    if kind == "prefix":
        return {"prefix": sm.prefix}
    if kind == "suffix":
        return {"regex": ".*" + literal(sm.suffix)}
    if kind == "contains":
        return {"regex": ".*" + literal(sm.contains) + ".*"}
    if kind == "safe_regex":
        return {"regex": _regex(sm.safe_regex.regex, f"{path}.safe_regex")}
    raise ConfigError(path, "empty string matcher")


def _regex(pattern: str, path: str) -> str:
    """A safe_regex from the configuration: RE2 syntax (no backreferences, no lookaround), Envoy's size limit."""
    return check_config_regex(pattern, path)


def _header_match(hm, path: str) -> HeaderMatch:
    only(
        hm,
        {
            "name",
            "exact_match",
            "safe_regex_match",
            "present_match",
            "prefix_match",
            "string_match",
            "invert_match",
            "suffix_match",
            "contains_match",
        },
        path,
    )
    kind = hm.WhichOneof("header_match_specifier")
    name = hm.name.lower()
    if not name:
        raise ConfigError(f"{path}.name", "a header match needs a name")
    values: dict = {}
    if kind == "exact_match":
        values = {"exact": hm.exact_match}
    elif kind == "prefix_match":
        values = {"prefix": hm.prefix_match}
    elif kind == "suffix_match":
        values = {"regex": ".*" + literal(hm.suffix_match)}
    elif kind == "contains_match":
        values = {"regex": ".*" + literal(hm.contains_match) + ".*"}
    elif kind == "safe_regex_match":
        values = {"regex": _regex(hm.safe_regex_match.regex, f"{path}.safe_regex_match")}
    elif kind == "present_match":
        values = {"present": hm.present_match}
    elif kind == "string_match":
        values = _string_match(hm.string_match, f"{path}.string_match")
    else:
        values = {"present": True}
    return HeaderMatch(name=name, invert=hm.invert_match, **values)


def _match(m, path: str) -> RouteMatch:
    only(
        m,
        {"prefix", "path", "safe_regex", "connect_matcher", "case_sensitive", "headers", "query_parameters", "grpc"},
        path,
    )
    if m.HasField("case_sensitive") and not m.case_sensitive.value:
        raise ConfigError(f"{path}.case_sensitive", "case-insensitive path matching is not supported")
    kind = m.WhichOneof("path_specifier")
    headers = tuple(_header_match(h, f"{path}.headers[{i}]") for i, h in enumerate(m.headers))
    if m.HasField("grpc"):
        headers += (HeaderMatch(name="content-type", prefix="application/grpc"),)
    query = []
    for i, q in enumerate(m.query_parameters):
        qpath = f"{path}.query_parameters[{i}]"
        only(q, {"name", "string_match", "present_match"}, qpath)
        if q.HasField("string_match"):
            sm = _string_match(q.string_match, f"{qpath}.string_match")
            if "prefix" in sm:
                sm = {"regex": literal(sm["prefix"]) + ".*"}
            query.append(QueryMatch(name=q.name, **sm))
        else:
            query.append(QueryMatch(name=q.name, present=True))
    common = {"headers": headers, "query": tuple(query)}
    if kind == "prefix":
        return RouteMatch(prefix=m.prefix or "/", **common)
    if kind == "path":
        return RouteMatch(prefix=None, path=m.path, **common)
    if kind == "safe_regex":
        return RouteMatch(prefix=None, regex=_regex(m.safe_regex.regex, f"{path}.safe_regex"), **common)
    if kind == "connect_matcher":
        only(m.connect_matcher, set(), f"{path}.connect_matcher")
        return RouteMatch(prefix=None, connect=True, **common)
    raise ConfigError(path, "a route match needs prefix, path, safe_regex or connect_matcher")


def _retry(rp, path: str) -> RetryPolicy:
    only(
        rp,
        {"retry_on", "num_retries", "per_try_timeout", "retriable_status_codes", "retry_back_off"},
        path,
        _RETRY_IGNORED,
    )
    retry_on = set()
    for token in filter(None, (t.strip() for t in rp.retry_on.split(","))):
        token = _RETRY_ALIASES.get(token, token)
        if token in _RETRY_GRPC:
            note_ignored(f"{path}.retry_on.{token}", "gRPC status retries are not made: fewer retries, never more")
            continue
        if token not in _RETRY_ON:
            raise ConfigError(
                f"{path}.retry_on", f"retry condition {token!r} is not supported ({', '.join(sorted(_RETRY_ON))})"
            )
        retry_on.add(token)
    base, cap = 0.025, 0.25
    if rp.HasField("retry_back_off"):
        base = seconds(rp.retry_back_off.base_interval) or base
        cap = opt_seconds(rp.retry_back_off, "max_interval") or base * 10
    return RetryPolicy(
        retry_on=frozenset(retry_on),
        num_retries=uint(rp, "num_retries", 1),
        per_try_timeout_s=opt_seconds(rp, "per_try_timeout"),
        retriable_status_codes=frozenset(rp.retriable_status_codes),
        backoff_base_s=base,
        backoff_max_s=cap,
    )


def _action(ra, path: str, default_retry, connect: bool = False) -> RouteAction:
    only(
        ra,
        {
            "cluster",
            "weighted_clusters",
            "cluster_not_found_response_code",
            "prefix_rewrite",
            "host_rewrite_literal",
            "timeout",
            "idle_timeout",
            "retry_policy",
            "request_mirror_policies",
            "hash_policy",
            "upgrade_configs",
        },
        path,
        _ACTION_IGNORED,
    )
    weighted: list[WeightedCluster] = []
    if ra.WhichOneof("cluster_specifier") == "weighted_clusters":
        for i, wc in enumerate(ra.weighted_clusters.clusters):
            only(wc, {"name", "weight"}, f"{path}.weighted_clusters.clusters[{i}]")
            weighted.append(WeightedCluster(wc.name, uint(wc, "weight", 0)))
        if not weighted or sum(w.weight for w in weighted) <= 0:
            raise ConfigError(f"{path}.weighted_clusters", "needs clusters with a total weight > 0")
    elif ra.WhichOneof("cluster_specifier") != "cluster":
        raise ConfigError(path, "a route action needs cluster or weighted_clusters")
    hashes = []
    for i, hp in enumerate(ra.hash_policy):
        hpath = f"{path}.hash_policy[{i}]"
        only(hp, {"header", "connection_properties", "terminal"}, hpath)
        if hp.HasField("header"):
            hashes.append(HashPolicy(header=hp.header.header_name.lower()))
        elif hp.HasField("connection_properties") and hp.connection_properties.source_ip:
            hashes.append(HashPolicy(source_ip=True))
        else:
            raise ConfigError(hpath, "only header and connection_properties.source_ip hashing are supported")
    mirrors = []
    for i, mp in enumerate(ra.request_mirror_policies):
        mpath = f"{path}.request_mirror_policies[{i}]"
        only(mp, {"cluster", "runtime_fraction"}, mpath)
        share = fraction(mp.runtime_fraction.default_value) if mp.HasField("runtime_fraction") else 1.0
        mirrors.append(Mirror(cluster=mp.cluster, fraction=share))
    timeout = opt_seconds(ra, "timeout")
    upgrades = translate_upgrades(ra.upgrade_configs, f"{path}.upgrade_configs", route_level=True)
    if connect and not any(uc.HasField("connect_config") for uc in ra.upgrade_configs):  # only CONNECT may have it
        raise ConfigError(f"{path}.upgrade_configs", _TERMINATE_CONNECT)
    return RouteAction(
        cluster=ra.cluster or None,
        weighted=tuple(weighted),
        timeout_s=timeout or None,  # 0 (Envoy: no timeout) -> the plane's SLA timeout
        idle_timeout_s=opt_seconds(ra, "idle_timeout"),
        retry=_retry(ra.retry_policy, f"{path}.retry_policy") if ra.HasField("retry_policy") else default_retry,
        prefix_rewrite=ra.prefix_rewrite or None,
        host_rewrite=ra.host_rewrite_literal or None,
        hash_policy=tuple(hashes),
        mirrors=tuple(mirrors),
        upgrades=upgrades,
    )


def _headers_to_add(options, path: str) -> tuple[HeaderValue, ...]:
    out = []
    for i, hvo in enumerate(options):
        only(hvo, {"header", "append", "append_action", "keep_empty_value"}, f"{path}[{i}]")
        # append_action: APPEND_IF_EXISTS_OR_ADD (0) appends; the others overwrite or add.
        append = hvo.append.value if hvo.HasField("append") else hvo.append_action == 0
        out.append(HeaderValue(hvo.header.key.lower(), hvo.header.value, append))
    return tuple(out)


def _per_route_filters(r, path: str) -> tuple[LocalRateLimit | None, FaultFilter | None]:
    """typed_per_filter_config: a per-route local rate limit (its own token bucket, as in Envoy), a fault, a
    CORS policy (noted); per-route config of any other filter is refused rather than silently ignored."""
    rate_limit = fault = None
    for name, cfg in sorted(r.typed_per_filter_config.items()):
        found = per_route_filter(name, cfg, f"{path}.typed_per_filter_config[{name}]")
        if isinstance(found, FaultFilter):
            fault = found
        elif found is not None:
            rate_limit = found
    return rate_limit, fault


def _route(r, path: str, inherited: dict, default_retry) -> Route:
    only(
        r,
        _HARMLESS
        | {
            "match",
            "route",
            "redirect",
            "direct_response",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "typed_per_filter_config",
        },
        path,
    )
    rate_limit, fault = _per_route_filters(r, path)
    match = _match(r.match, f"{path}.match")
    kind = r.WhichOneof("action")
    action = redirect = direct = None
    if kind == "route":
        action = _action(r.route, f"{path}.route", default_retry, connect=match.connect)
    elif kind == "redirect":
        rd = r.redirect
        only(
            rd,
            {"https_redirect", "scheme_redirect", "host_redirect", "path_redirect", "response_code"},
            f"{path}.redirect",
        )
        scheme = "https" if rd.https_redirect else (rd.scheme_redirect or None)
        redirect = Redirect(
            host=rd.host_redirect or None,
            path=rd.path_redirect or None,
            scheme=scheme,
            code=_REDIRECT_CODES.get(rd.response_code, 301),
        )
    elif kind == "direct_response":
        dr = r.direct_response
        if not 200 <= dr.status <= 599:
            raise ConfigError(f"{path}.direct_response.status", f"{dr.status} is not an HTTP status (200..599)")
        body = b""
        if dr.HasField("body"):
            only(dr.body, {"inline_string", "inline_bytes"}, f"{path}.direct_response.body")
            body = dr.body.inline_bytes or dr.body.inline_string.encode()
        direct = DirectResponse(status=dr.status, body=body)
    else:
        raise ConfigError(path, f"route action {kind or 'none'!r} is not supported (route, redirect, direct_response)")
    return Route(
        match=match,
        action=action,
        redirect=redirect,
        direct_response=direct,
        name=r.name,
        request_headers_to_add=_headers_to_add(r.request_headers_to_add, f"{path}.request_headers_to_add")
        + inherited["request_add"],
        request_headers_to_remove=tuple(h.lower() for h in r.request_headers_to_remove) + inherited["request_remove"],
        response_headers_to_add=_headers_to_add(r.response_headers_to_add, f"{path}.response_headers_to_add")
        + inherited["response_add"],
        response_headers_to_remove=tuple(h.lower() for h in r.response_headers_to_remove)
        + inherited["response_remove"],
        rate_limit=rate_limit,
        fault=fault,
    )


def _header_ops(msg, path: str) -> dict:
    return {
        "request_add": _headers_to_add(msg.request_headers_to_add, f"{path}.request_headers_to_add"),
        "request_remove": tuple(h.lower() for h in msg.request_headers_to_remove),
        "response_add": _headers_to_add(msg.response_headers_to_add, f"{path}.response_headers_to_add"),
        "response_remove": tuple(h.lower() for h in msg.response_headers_to_remove),
    }


class RouteMemo:
    """Translated virtual hosts and routes of the previous update, reused when their bytes are the same.

    RDS sends a whole RouteConfiguration for a one-route change (10,000 routes: ~0.25 s to translate again);
    with a memo only the virtual host that changed is translated, and within it only the routes that changed.
    Unchanged ones come back as the very same objects, which the worker channel (agent/worker_channel.py) and
    the router (agent/proxy/routing.py) recognise by identity. Keys hold the serialized message and what it
    inherits, so an equal key is an equal translation. Only the last update's entries are kept.
    """

    def __init__(self) -> None:
        # vhost key -> (the translation, the keys of its routes: they stay while it does)
        self._vhosts: dict[tuple, tuple[VirtualHost, list[tuple]]] = {}
        self._routes: dict[tuple, Route] = {}
        self._next_vhosts: dict[tuple, tuple[VirtualHost, list[tuple]]] = {}
        self._next_routes: dict[tuple, Route] = {}
        self._route_keys: list[tuple] = []  # of the virtual host being translated
        self.vhost_hits = self.vhost_misses = self.route_hits = self.route_misses = 0

    def begin(self) -> None:
        self._next_vhosts, self._next_routes = {}, {}

    def commit(self) -> None:
        """The update translated without error: its entries are what the next one is compared with."""
        self._vhosts, self._routes = self._next_vhosts, self._next_routes

    def vhost(self, key: tuple, make) -> VirtualHost:
        found = self._vhosts.get(key) or self._next_vhosts.get(key)
        if found is None:
            self.vhost_misses += 1
            self._route_keys = []
            found = (make(), self._route_keys)
        else:
            self.vhost_hits += 1
            routes = self._routes
            for rkey in found[1]:
                self._next_routes[rkey] = routes.get(rkey) or self._next_routes[rkey]
        self._next_vhosts[key] = found
        return found[0]

    def route(self, key: tuple, make) -> Route:
        found = self._routes.get(key) or self._next_routes.get(key)
        if found is None:
            self.route_misses += 1
            found = make()
        else:
            self.route_hits += 1
        self._next_routes[key] = found
        self._route_keys.append(key)
        return found


def _wire(msg) -> bytes:
    """A digest of the message's deterministic encoding: memo keys hold 16 bytes instead of the message's
    (10,000 routes: ~1 MB of route and ~1.4 MB of virtual host encodings otherwise kept in the agent)."""
    return hashlib.blake2b(msg.SerializeToString(deterministic=True), digest_size=16).digest()


def _virtual_host(vh, vi: int, vpath: str, top: dict, memo: RouteMemo | None) -> VirtualHost:
    own = _header_ops(vh, vpath)
    inherited = {k: own[k] + top[k] for k in own}
    default_retry = _retry(vh.retry_policy, f"{vpath}.retry_policy") if vh.HasField("retry_policy") else None
    if memo is None:
        routes = tuple(_route(r, f"{vpath}.routes[{ri}]", inherited, default_retry) for ri, r in enumerate(vh.routes))
    else:
        inherited_key = (*inherited.values(), default_retry)
        routes = tuple(
            memo.route(
                (_wire(r), inherited_key),
                lambda r=r, ri=ri: _route(r, f"{vpath}.routes[{ri}]", inherited, default_retry),
            )
            for ri, r in enumerate(vh.routes)
        )
    return VirtualHost(name=vh.name or f"vhost{vi}", domains=tuple(d.lower() for d in vh.domains), routes=routes)


def translate_route_config(rc, path: str, memo: RouteMemo | None = None) -> RouteConfig:
    """Route-, virtual-host- and configuration-level header changes are merged, the most specific first.
    With `memo` (one per route configuration name and xDS client), unchanged virtual hosts and routes are not
    translated again."""
    _ops = {
        "request_headers_to_add",
        "request_headers_to_remove",
        "response_headers_to_add",
        "response_headers_to_remove",
    }
    only(rc, _HARMLESS | {"virtual_hosts", "validate_clusters"} | _ops, path, _RC_IGNORED)
    top = _header_ops(rc, path)
    top_key = tuple(top.values())
    if memo is not None:
        memo.begin()
    vhosts = []
    seen_domains: dict[str, str] = {}
    for vi, vh in enumerate(rc.virtual_hosts):
        vpath = f"{path}.virtual_hosts[{vi}]"
        only(vh, _HARMLESS | {"domains", "routes", "retry_policy"} | _ops, vpath, _VHOST_IGNORED)
        if not vh.domains:
            raise ConfigError(f"{vpath}.domains", "a virtual host needs at least one domain")
        for domain in vh.domains:
            key = domain.lower()
            if key in seen_domains:
                raise ConfigError(
                    f"{vpath}.domains", f"domain {domain!r} is also in virtual host {seen_domains[key]!r}"
                )
            seen_domains[key] = vh.name
        if memo is None:
            vhosts.append(_virtual_host(vh, vi, vpath, top, None))
        else:
            vkey = (_wire(vh), vh.name or vi, top_key)
            make = lambda vh=vh, vi=vi, vpath=vpath: _virtual_host(vh, vi, vpath, top, memo)  # noqa: E731
            vhosts.append(memo.vhost(vkey, make))
    if memo is not None:
        memo.commit()
    return RouteConfig(name=rc.name, virtual_hosts=tuple(vhosts))
