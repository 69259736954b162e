"""HTTP and network filters of a listener's filter chain, and per-route filter configs (typed_per_filter_config).

A filter is implemented (router, fault, local_ratelimit, HTTP RBAC: xds/translate_rbac.py), accepted without
effect when Envoy's semantics allow it (statistics, an empty cors filter, shadow-only RBAC, the istio-proxy
extensions: each noted with its reason), or refused by name. Security filters that would deny requests and that
planemesh does not implement (network RBAC, ext_authz) are never ignored.
"""

from __future__ import annotations

from collections.abc import Callable

from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from google.protobuf import any_pb2

from planemesh.model.config import ConfigError, FaultFilter, HttpFilter, LocalRateLimit
from planemesh.xds.istio_ext import istio_extension
from planemesh.xds.translate_common import fraction, note_ignored, only, seconds, type_name, uint

_EXT = "envoy.extensions."
LOCAL_RATELIMIT = _EXT + "filters.http.local_ratelimit.v3.LocalRateLimit"
ROUTER = _EXT + "filters.http.router.v3.Router"
FAULT = _EXT + "filters.http.fault.v3.HTTPFault"
RBAC = _EXT + "filters.http.rbac.v3.RBAC"
CORS = _EXT + "filters.http.cors.v3.Cors"
CORS_POLICY = _EXT + "filters.http.cors.v3.CorsPolicy"
# HTTP filters whose only output is statistics: dropping them changes no request.
_STATS_ONLY = {
    _EXT + "filters.http.grpc_stats.v3.FilterConfig": "grpc_stats: gRPC request counters only",
}
_CORS_REASON = (
    "cors: planemesh adds no Access-Control-* headers, so browsers refuse cross-origin responses "
    "(fail closed) and preflight OPTIONS requests reach the upstream"
)


def network_filter(flt, path: str) -> None:
    """A non-terminal network filter: accepted (and noted) when harmless, else refused."""
    kind = type_name(flt.typed_config.type_url)
    if (why := istio_extension(flt.name, flt.typed_config)) is not None:
        note_ignored(path, why)
        return
    if kind == _EXT + "filters.network.rbac.v3.RBAC":
        from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2

        cfg = net_rbac_pb2.RBAC()
        flt.typed_config.Unpack(cfg)
        if not cfg.HasField("rules"):
            note_ignored(path, "RBAC with shadow rules only (dry run): statistics, never a denial")
            return
        raise ConfigError(path, "RBAC enforcement is not supported (an authorization policy is never ignored)")
    raise ConfigError(path, f"network filter {flt.name!r} ({kind or 'no typed_config'}) is not supported")


def http_filters(hcm, path: str, rbac: Callable[[any_pb2.Any, str], object] | None = None) -> tuple[HttpFilter, ...]:
    """An HCM's http_filters -> planemesh filters; the router must be last. `rbac` translates an enforcing
    RBAC filter (xds/translate_rbac.py, passed in: it depends on translate_routes, which imports this module)."""
    out: list[HttpFilter] = []
    filters = list(hcm.http_filters)
    for i, hf in enumerate(filters):
        fpath = f"{path}.http_filters[{i}]"
        kind = type_name(hf.typed_config.type_url)
        if hf.HasField("config_discovery"):
            raise ConfigError(fpath, "filter config discovery (ECDS) is not supported")
        if kind == ROUTER:
            if i != len(filters) - 1:
                raise ConfigError(fpath, "the router filter must be the last HTTP filter")
        elif hf.disabled:
            continue  # disabled by default and enabled per route: planemesh has no per-route filter config
        elif kind == FAULT:
            out.append(fault(hf.typed_config, fpath))
        elif kind == LOCAL_RATELIMIT:
            rl = local_ratelimit(hf.typed_config, fpath)
            if rl is not None:
                out.append(rl)
        elif (why := istio_extension(hf.name, hf.typed_config) or _STATS_ONLY.get(kind)) is not None:
            note_ignored(fpath, why)
        elif kind == CORS:
            note_ignored(fpath, _CORS_REASON)
        elif kind == RBAC:
            if (enforced := _http_rbac(hf.typed_config, fpath, rbac)) is not None:
                out.append(enforced)  # type: ignore[arg-type]
        elif hf.is_optional:
            note_ignored(fpath, "is_optional: Envoy too runs without a filter it does not have")
        else:
            raise ConfigError(fpath, f"HTTP filter {hf.name!r} ({kind or 'no typed_config'}) is not supported")
    if not filters or type_name(filters[-1].typed_config.type_url) != ROUTER:
        raise ConfigError(f"{path}.http_filters", "the last HTTP filter must be envoy.filters.http.router")
    return tuple(out)


def _http_rbac(typed_config: any_pb2.Any, path: str, rbac) -> object | None:
    """Enforcing rules: `rbac` (HTTP RBAC, docs/security.md); shadow rules only: noted."""
    cfg = rbac_pb2.RBAC()
    typed_config.Unpack(cfg)
    if not cfg.HasField("rules"):
        note_ignored(path, "RBAC with shadow rules only (dry run): statistics, never a denial")
        return None
    if rbac is None:
        raise ConfigError(path, "RBAC enforcement is not supported here (an authorization policy is never ignored)")
    if cfg.HasField("shadow_rules") or cfg.shadow_rules_stat_prefix:
        note_ignored(f"{path}.shadow_rules", "dry-run rules: statistics, never a denial (the enforced rules apply)")
        cfg.ClearField("shadow_rules")
        cfg.ClearField("shadow_rules_stat_prefix")
        typed_config = any_pb2.Any()
        typed_config.Pack(cfg)
    return rbac(typed_config, path)


def fault(typed_config: any_pb2.Any, path: str) -> FaultFilter:
    cfg = fault_pb2.HTTPFault()
    typed_config.Unpack(cfg)
    only(cfg, {"delay", "abort"}, path)
    delay_s = delay_pct = abort_pct = 0.0
    abort_status = None
    header = False
    if cfg.HasField("delay"):
        only(cfg.delay, {"fixed_delay", "header_delay", "percentage"}, f"{path}.delay")
        delay_s = seconds(cfg.delay.fixed_delay)
        delay_pct = fraction(cfg.delay.percentage) * 100 if cfg.delay.HasField("percentage") else 100.0
        header = header or cfg.delay.HasField("header_delay")
    if cfg.HasField("abort"):
        only(cfg.abort, {"http_status", "header_abort", "percentage"}, f"{path}.abort")
        if cfg.abort.http_status and not 200 <= cfg.abort.http_status <= 599:
            raise ConfigError(f"{path}.abort.http_status", f"{cfg.abort.http_status} is not an HTTP status")
        abort_status = cfg.abort.http_status or None
        abort_pct = fraction(cfg.abort.percentage) * 100 if cfg.abort.HasField("percentage") else 100.0
        header = header or cfg.abort.HasField("header_abort")
    return FaultFilter(
        delay_s=delay_s or None,
        delay_percent=delay_pct if delay_s or header else 0.0,
        abort_status=abort_status,
        abort_percent=abort_pct if abort_status or header else 0.0,
        header_controlled=header,
    )


def per_route_filter(name: str, cfg: any_pb2.Any, path: str) -> LocalRateLimit | FaultFilter | None:
    """One typed_per_filter_config entry: a local rate limit (its own bucket), a fault (Istio's VirtualService
    fault: injected after routing), a CORS policy (noted), else refused."""
    kind = type_name(cfg.type_url)
    if kind == LOCAL_RATELIMIT:
        return local_ratelimit(cfg, path)
    if kind == FAULT:
        return fault(cfg, path)
    if kind == CORS_POLICY:
        note_ignored(path, _CORS_REASON)
        return None
    if (why := istio_extension(name, cfg)) is not None:
        note_ignored(path, why)
        return None
    raise ConfigError(path, f"per-route config of {kind or name!r} is not supported")


def local_ratelimit(typed_config: any_pb2.Any, path: str) -> LocalRateLimit | None:
    """The local_ratelimit filter's config (listener filter or per-route); None when it is disabled."""
    cfg = local_rate_limit_pb2.LocalRateLimit()
    typed_config.Unpack(cfg)
    only(cfg, {"stat_prefix", "token_bucket", "filter_enabled", "filter_enforced", "status"}, path)
    if not cfg.HasField("token_bucket"):
        raise ConfigError(f"{path}.token_bucket", "a local rate limit needs a token bucket")
    # Envoy enforces only the runtime fraction in filter_enabled/filter_enforced; planemesh enforces
    # all or nothing: a 0% fraction disables the filter, anything else enforces it fully.
    for key in ("filter_enabled", "filter_enforced"):
        if cfg.HasField(key) and fraction(getattr(cfg, key).default_value) == 0:
            return None
    tb = cfg.token_bucket
    interval = seconds(tb.fill_interval)
    if tb.max_tokens < 1 or interval <= 0:
        raise ConfigError(f"{path}.token_bucket", "needs max_tokens >= 1 and fill_interval > 0")
    return LocalRateLimit(
        max_tokens=tb.max_tokens, tokens_per_fill=uint(tb, "tokens_per_fill", 1), fill_interval_s=interval
    )
