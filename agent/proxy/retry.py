"""Retry decisions for one request, pure: which failures a policy covers, the back-off, the plane's default."""

from __future__ import annotations

import functools
import random
from typing import TYPE_CHECKING

from planemesh.agent.config import RetryPolicy

if TYPE_CHECKING:
    from planemesh.netplanes.model import SLA

RETRY_ON_TIMEOUT = frozenset({"5xx", "gateway-error", "reset"})
GATEWAY_ERRORS = frozenset({502, 503, 504})
NO_RETRY = RetryPolicy(num_retries=0)
rng = random.Random()  # the requests' dice: fault percentages, back-off jitter, mirror fractions


@functools.lru_cache(maxsize=64)
def sla_retry(sla: SLA) -> RetryPolicy:
    """The plane SLA's retries as a route retry policy (used when the route has none)."""
    return RetryPolicy(
        retry_on=frozenset(sla.retry_on), num_retries=sla.retries, per_try_timeout_s=sla.per_try_timeout_s
    )


def backoff_s(policy: RetryPolicy, retry_number: int, roll: float) -> float:
    """Envoy's fully jittered exponential back-off: uniform in [0, min(max, base * 2^(n-1)))."""
    ceiling = min(policy.backoff_max_s, policy.backoff_base_s * (2 ** max(0, retry_number - 1)))
    return max(0.0, ceiling * roll)


def covers(policy: RetryPolicy, condition: str, status: int = 0) -> bool:
    """Whether `policy` retries this failure: "status" (with the HTTP status), "timeout", "connect-failure"
    or "reset" (Envoy's 5xx covers resets too)."""
    retry_on = policy.retry_on
    if condition == "status":
        return (
            ("5xx" in retry_on and status >= 500)
            or ("gateway-error" in retry_on and status in GATEWAY_ERRORS)
            or ("retriable-status-codes" in retry_on and status in policy.retriable_status_codes)
        )
    if condition == "timeout":
        return bool(retry_on & RETRY_ON_TIMEOUT)
    if condition == "connect-failure":
        return "connect-failure" in retry_on or "gateway-error" in retry_on or "5xx" in retry_on
    return condition in retry_on or "5xx" in retry_on
