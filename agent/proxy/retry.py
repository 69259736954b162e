"""Retry decisions for one request, pure: which failures a policy covers, the back-off, the plane's default."""

from __future__ import annotations

import functools
import os
import random
from typing import TYPE_CHECKING

from planemesh.agent.proxy.circuit import RETRIES
from planemesh.model.config import RetryPolicy

if TYPE_CHECKING:
    from planemesh.agent.proxy.circuit import CircuitBreaker
    from planemesh.model.planes import SLA

RETRY_ON_TIMEOUT = frozenset({"5xx", "gateway-error", "reset"})
GATEWAY_ERRORS = frozenset({502, 503, 504})
NO_RETRY = RetryPolicy(num_retries=0)
MAX_REPLAY_BODY = 64 * 1024  # a request body up to this size is kept so a retry can send it again
rng = random.Random()  # the requests' dice: fault percentages, back-off jitter, mirror fractions
os.register_at_fork(after_in_child=rng.seed)  # forked workers (agent/zygote.py) roll their own dice


_last_sla: list = [None, NO_RETRY]  # the last SLA asked for and its policy: an SLA's hash costs per request


def sla_retry(sla: SLA) -> RetryPolicy:
    """The plane SLA's retries as a route retry policy (used when the route has none)."""
    last = _last_sla
    if last[0] is not sla:
        last[1] = _sla_retry(sla)
        last[0] = sla
    return last[1]


@functools.lru_cache(maxsize=64)
def _sla_retry(sla: SLA) -> RetryPolicy:
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


class Retries:
    """The retries of one request, sans-IO: the policy, tries left, the cluster breaker's RETRIES units held
    (the retry budget). Used by attempts.Attempt for both protocols; call release() when the request ends."""

    __slots__ = ("breaker", "held", "policy", "tries_left")

    def __init__(self, policy: RetryPolicy, breaker: CircuitBreaker | None) -> None:
        self.policy = policy
        self.breaker = breaker
        self.tries_left = policy.num_retries
        self.held = 0

    def may_retry(self, condition: str, status: int = 0, replayable: bool = True) -> bool:
        """Whether the policy covers this failure and a retry is still allowed (a RETRIES unit is taken)."""
        if not replayable or self.tries_left <= 0 or not covers(self.policy, condition, status):
            return False
        breaker = self.breaker
        if breaker is not None:
            if not breaker.try_acquire(RETRIES):
                self.tries_left = 0  # the cluster's retry budget is spent: the failure goes to the client (URX)
                return False
            self.held += 1
        return True

    def next_backoff(self, roll: float) -> float:
        """One retry starts: the back-off before it (Envoy's jittered exponential)."""
        self.tries_left -= 1
        return backoff_s(self.policy, self.policy.num_retries - self.tries_left, roll)

    def exhausted(self, flag: str) -> str:
        """`flag`, plus URX when retries were configured and all were used."""
        if self.policy.num_retries > 0 and self.tries_left <= 0:
            return f"{flag},URX" if flag else "URX"
        return flag

    def release(self) -> None:
        breaker = self.breaker
        if breaker is not None:
            for _ in range(self.held):
                breaker.release(RETRIES)
        self.held = 0


NO_RETRIES = Retries(NO_RETRY, None)  # shared by every request without retries: never changed (no retry is taken)
