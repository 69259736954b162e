"""Per-cluster circuit breakers (Envoy's thresholds): counters that refuse instead of queueing.

Each in-flight request, each connecting attempt, each open upstream attempt and each retry in progress
holds one unit of its counter; when a counter is at its maximum the request is answered 503 UO at once.
"""

from __future__ import annotations

from planemesh.model.config import CircuitBreakers

REQUESTS, PENDING, CONNECTIONS, RETRIES = "requests", "pending", "connections", "retries"


class CircuitBreaker:
    __slots__ = ("counts", "limits", "overflows")

    def __init__(self, limits: CircuitBreakers) -> None:
        self.limits = {
            REQUESTS: limits.max_requests,
            PENDING: limits.max_pending_requests,
            CONNECTIONS: limits.max_connections,
            RETRIES: limits.max_retries,
        }
        self.counts = dict.fromkeys(self.limits, 0)
        self.overflows = dict.fromkeys(self.limits, 0)

    def try_acquire(self, which: str) -> bool:
        counts = self.counts
        n = counts[which]
        if n >= self.limits[which]:
            self.overflows[which] += 1
            return False
        counts[which] = n + 1
        return True

    def release(self, which: str) -> None:
        counts = self.counts
        n = counts[which]
        if n > 0:
            counts[which] = n - 1

    def is_open(self, which: str) -> bool:
        return self.counts[which] >= self.limits[which]
