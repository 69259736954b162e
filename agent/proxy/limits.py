"""Per-plane admission: a local token bucket (clock injectable), the per-source connection share and the
idle deadline of connections, and the overload answers. Sans-IO: the proxy passes connections (any hashable
key), addresses and the time in; nothing here reads a clock or a socket unless given one."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from planemesh.agent.proxy.http1 import local_reply
from planemesh.model.planes import SLA


class TokenBucket:
    """`rate` tokens per second, at most `burst`; `take()` is O(1) and never sleeps."""

    __slots__ = ("_clock", "_last", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self._clock = clock
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        elapsed = now - self._last
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self._last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def retry_after_s(self) -> int:
        """Whole seconds until a token is available (at least 1)."""
        missing = 1 - self.tokens
        return max(1, math.ceil(missing / self.rate)) if self.rate > 0 else 1


def bucket_for(sla: SLA, clock: Callable[[], float] = time.monotonic) -> TokenBucket | None:
    if sla.rate_limit_rps is None or sla.rate_limit_rps <= 0:
        return None
    burst = sla.rate_limit_burst or max(1, int(sla.rate_limit_rps))
    return TokenBucket(sla.rate_limit_rps, burst, clock)


def rate_limited_headers(bucket: TokenBucket) -> list[tuple[bytes, bytes]]:
    retry = str(bucket.retry_after_s()).encode()
    return [
        (b"x-ratelimit-limit", str(bucket.burst).encode()),
        (b"x-ratelimit-remaining", b"0"),
        (b"x-ratelimit-reset", retry),
        (b"retry-after", retry),
    ]


# Above this share of max_connections the plane is "under pressure": every idle connection (never used, or
# kept alive between requests) gets PRESSURED_IDLE_TIMEOUT_S instead of its usual timeout. Envoy's overload
# manager scales idle timeouts the same way (reduce_timeouts); 3/4 leaves room for the burst that follows.
PRESSURE_FRACTION = 0.75
PRESSURED_IDLE_TIMEOUT_S = 1.0  # long enough for a client that just connected to send its request head
DEFAULT_SOURCE_SHARE = 4  # max_connections_per_source unset: max_connections // 4 (1024 of the default 4096)


def per_source_limit(sla: SLA) -> int:
    if sla.max_connections_per_source is not None:
        return max(1, sla.max_connections_per_source)
    return max(1, sla.max_connections // DEFAULT_SOURCE_SHARE)


# Why PlaneProxy.admit refused a connection (also the x-planemesh-overloaded value, and an h2 GOAWAY's debug
# data) -> the HTTP/1.1 answer. An h2 connection gets a GOAWAY instead (h2_downstream.H2Downstream.refuse).
REFUSED_MEMORY, REFUSED_SOURCE, REFUSED_CONNECTIONS = "memory", "source-connections", "connections"
MEMORY_SHED_BODY = b"overloaded\n"
MEMORY_SHED_HEADERS = ((b"x-planemesh-overloaded", REFUSED_MEMORY.encode()),)
H1_REFUSALS = {
    REFUSED_MEMORY: local_reply(503, MEMORY_SHED_BODY, MEMORY_SHED_HEADERS, close=True),
    REFUSED_SOURCE: local_reply(
        503,
        b"too many connections from this address\n",
        [(b"x-planemesh-overloaded", b"source-connections")],
        close=True,
    ),
    REFUSED_CONNECTIONS: local_reply(503, b"overloaded\n", [(b"x-planemesh-overloaded", b"connections")], close=True),
}


class ClientConnection(Protocol):
    """A client connection as the plane's admission, idle sweep, drain and overload manager see it, whatever its
    codec (downstream.Downstream for HTTP/1.1, h2_downstream.H2Downstream for h2c): admitted and released once,
    swept while idle, reset when it holds the biggest buffers (overload.BufferHolder)."""

    peer_ip: str  # the client's address: its connection share
    last_active: float  # loop time it was accepted, or a request was last seen or finished (not any byte: h2 PINGs)

    @property
    def active(self) -> object | None:
        """What is being answered (None: idle between requests, or never used)."""

    @property
    def in_headers(self) -> bool:
        """A request head has begun and is not complete (the slow-header timeout applies, not the idle one)."""

    def headers_overdue(self, now: float, timeout_s: float) -> bool: ...

    def close(self) -> None:
        """Close gracefully (what is queued goes out first; h2: GOAWAY(NO_ERROR))."""

    def stop_keep_alive(self) -> None:
        """Drain or shed: no request after those in progress (h2: a graceful GOAWAY), then close once idle."""

    def buffered_bytes(self) -> int: ...

    def abort(self) -> None: ...


@dataclass(slots=True)
class _Conn:
    source: str
    accepted_at: float


class ConnectionShare:
    """Which connections of a plane (one worker's view) came from which client address, and when.

    `admit` refuses a connection past the plane's total or past its source's share; `release` forgets it.
    `idle_expired` says whether an idle connection has stayed long enough to be closed: one that never sent a
    byte after `idle_connection_timeout_s`, one between requests after the SLA's `idle_timeout_s`, and any
    idle one after PRESSURED_IDLE_TIMEOUT_S while the plane is under pressure.
    """

    __slots__ = ("_conns", "by_source", "max_connections", "never_used_s", "per_source")

    def __init__(self, sla: SLA) -> None:
        self._conns: dict[Hashable, _Conn] = {}
        self.by_source: dict[str, int] = {}
        self.configure(sla)

    def configure(self, sla: SLA) -> None:
        """New SLA values apply to the next decisions; connections already admitted stay."""
        self.max_connections = sla.max_connections
        self.per_source = per_source_limit(sla)
        self.never_used_s = sla.idle_connection_timeout_s

    def __len__(self) -> int:
        return len(self._conns)

    def admit(self, key: Hashable, source: str, now: float, total: int) -> str | None:
        """None (admitted and counted), or why not: "connections" (the plane's `total` open connections,
        this one included, exceed max_connections) or "source" (its address holds its whole share)."""
        if total > self.max_connections:
            return "connections"
        held = self.by_source.get(source, 0)
        if held >= self.per_source:
            return "source"
        self.by_source[source] = held + 1
        self._conns[key] = _Conn(source, now)
        return None

    def release(self, key: Hashable) -> None:
        conn = self._conns.pop(key, None)
        if conn is None:
            return
        left = self.by_source[conn.source] - 1
        if left:
            self.by_source[conn.source] = left
        else:
            del self.by_source[conn.source]

    def pressured(self, total: int) -> bool:
        return total > self.max_connections * PRESSURE_FRACTION

    def idle_expired(self, key: Hashable, last_active: float, now: float, keepalive_s: float, pressure: bool) -> bool:
        """An idle connection (no request in progress) whose last byte came at `last_active`."""
        conn = self._conns.get(key)
        idle = now - last_active
        if pressure:
            return idle > PRESSURED_IDLE_TIMEOUT_S
        if conn is not None and last_active <= conn.accepted_at:  # not a byte since it was accepted
            return bool(self.never_used_s) and idle > self.never_used_s
        return idle > keepalive_s
