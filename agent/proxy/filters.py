"""The listener's HTTP filters, pure: fault injection decisions and the local rate limit token bucket.

    decision = fault_decision(fault_filter, headers, rng.random)   # -> FaultDecision(delay_s, abort_status)
    limiter = LocalRateLimiter(LocalRateLimit(10, 10, 1.0), clock)
    ok = limiter.take(); limiter.headers()                          # x-ratelimit-limit/remaining/reset
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from planemesh.agent.rbac import RbacFilter
from planemesh.model.config import FaultFilter, LocalRateLimit

ABORT_HEADER = "x-envoy-fault-abort-request"
ABORT_PERCENT_HEADER = "x-envoy-fault-abort-request-percentage"
DELAY_HEADER = "x-envoy-fault-delay-request"  # milliseconds
DELAY_PERCENT_HEADER = "x-envoy-fault-delay-request-percentage"
MAX_FAULT_DELAY_S = 60.0  # a header cannot hold a request longer than this
DELAY_INJECTED, FAULT_INJECTED = "DI", "FI"  # access log response flags


@dataclass(frozen=True, slots=True)
class FaultDecision:
    delay_s: float | None = None
    abort_status: int | None = None


NO_FAULT = FaultDecision()


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    """A numeric header value, None when absent or malformed (a bad header never breaks the request)."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw.split(",")[0].strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def fault_decision(fault: FaultFilter, headers: Mapping[str, str], roll: Callable[[], float]) -> FaultDecision:
    """Delay and/or abort for one request. `roll()` returns a uniform number in [0, 1).

    With header_controlled, x-envoy-fault-* request headers supply the delay (ms), abort status and their
    percentages (default 100) in place of the configured ones."""
    delay_s, delay_pct = fault.delay_s, fault.delay_percent
    abort, abort_pct = fault.abort_status, fault.abort_percent
    if fault.header_controlled:
        ms = _header_number(headers, DELAY_HEADER)
        if ms is not None:
            delay_s = min(ms / 1000.0, MAX_FAULT_DELAY_S)
            delay_pct = _header_number(headers, DELAY_PERCENT_HEADER)
            delay_pct = 100.0 if delay_pct is None else delay_pct
        status = _header_number(headers, ABORT_HEADER)
        if status is not None and 200 <= status < 600:
            abort = int(status)
            abort_pct = _header_number(headers, ABORT_PERCENT_HEADER)
            abort_pct = 100.0 if abort_pct is None else abort_pct
    out_delay = delay_s if delay_s and delay_pct > 0 and roll() * 100 < delay_pct else None
    out_abort = abort if abort is not None and abort_pct > 0 and roll() * 100 < abort_pct else None
    if out_delay is None and out_abort is None:
        return NO_FAULT
    return FaultDecision(out_delay, out_abort)


class LocalRateLimiter:
    """Envoy's local rate limit bucket: starts full with max_tokens, adds tokens_per_fill every
    fill_interval (whole intervals, as Envoy's timer does), never above max_tokens."""

    __slots__ = ("clock", "config", "next_fill", "tokens")

    def __init__(self, config: LocalRateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.tokens = config.max_tokens
        self.next_fill = clock() + config.fill_interval_s

    def _refill(self) -> float:
        now = self.clock()
        cfg = self.config
        if now >= self.next_fill and cfg.fill_interval_s > 0:
            intervals = int((now - self.next_fill) // cfg.fill_interval_s) + 1
            self.tokens = min(cfg.max_tokens, self.tokens + intervals * cfg.tokens_per_fill)
            self.next_fill += intervals * cfg.fill_interval_s
        return now

    def take(self) -> bool:
        self._refill()
        if self.tokens > 0:
            self.tokens -= 1
            return True
        return False

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The x-ratelimit-* headers Envoy adds (draft-ietf-httpapi-ratelimit-headers)."""
        now = self._refill()
        reset = max(0, math.ceil(self.next_fill - now))
        return [
            (b"x-ratelimit-limit", str(self.config.max_tokens).encode()),
            (b"x-ratelimit-remaining", str(self.tokens).encode()),
            (b"x-ratelimit-reset", str(reset).encode()),
        ]


class FilterChain:
    """A listener's filters with their state (the rate limit bucket), built once per snapshot."""

    __slots__ = ("faults", "limiters", "rbac")

    def __init__(self, filters: tuple[object, ...], clock: Callable[[], float]) -> None:
        self.rbac = tuple(f for f in filters if isinstance(f, RbacFilter))  # agent/rbac.py, first (Envoy: filter order)
        self.faults = tuple(f for f in filters if isinstance(f, FaultFilter))
        self.limiters = tuple(LocalRateLimiter(f, clock) for f in filters if isinstance(f, LocalRateLimit))
