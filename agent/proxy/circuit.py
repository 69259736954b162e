"""Per-cluster circuit breakers (Envoy's thresholds).

Each in-flight request, each connecting attempt, each open upstream attempt and each retry in progress
holds one unit of its counter; when a counter is at its maximum the request is answered 503 UO at once, but
for `connections`: as Envoy's pools, an attempt that finds every connection unit taken waits for one as a
pending request (holding a `pending` unit; 503 UO only when those are gone too), and a connection unit given
back goes to the longest waiting attempt (an h2 stream may also take a stream that comes free meanwhile:
h2_upstream.H2Pool).
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Protocol

from planemesh.model.config import CircuitBreakers

REQUESTS, PENDING, CONNECTIONS, RETRIES = "requests", "pending", "connections", "retries"


class ConnectionWaiter(Protocol):
    def connection_granted(self) -> None:
        """A connection unit is this waiter's now (handed over by release: the count did not change)."""


class CircuitBreaker:
    __slots__ = ("counts", "limits", "overflows", "waiters")

    def __init__(self, limits: CircuitBreakers) -> None:
        self.limits = {
            REQUESTS: limits.max_requests,
            PENDING: limits.max_pending_requests,
            CONNECTIONS: limits.max_connections,
            RETRIES: limits.max_retries,
        }
        self.counts = dict.fromkeys(self.limits, 0)
        self.overflows = dict.fromkeys(self.limits, 0)
        self.waiters: deque[ConnectionWaiter] = deque()  # attempts waiting for a connection unit, oldest first

    def try_acquire(self, which: str) -> bool:
        counts = self.counts
        n = counts[which]
        if n >= self.limits[which]:
            self.overflows[which] += 1
            return False
        counts[which] = n + 1
        return True

    def release(self, which: str) -> None:
        if which == CONNECTIONS and self.waiters:  # the unit goes on to the longest waiting attempt
            self.waiters.popleft().connection_granted()
            return
        counts = self.counts
        n = counts[which]
        if n > 0:
            counts[which] = n - 1

    def wait_for_connection(self, waiter: ConnectionWaiter) -> None:
        self.waiters.append(waiter)

    def stop_waiting(self, waiter: ConnectionWaiter) -> None:
        with contextlib.suppress(ValueError):  # granted meanwhile: no longer waiting
            self.waiters.remove(waiter)

    def is_open(self, which: str) -> bool:
        return self.counts[which] >= self.limits[which]
