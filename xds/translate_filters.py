"""HTTP filter configs that appear both in a listener's filter chain and per route (typed_per_filter_config)."""

from __future__ import annotations

from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from google.protobuf import any_pb2

from planemesh.agent.config import ConfigError, LocalRateLimit
from planemesh.xds.translate_common import fraction, only, seconds, uint

LOCAL_RATELIMIT = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"


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
