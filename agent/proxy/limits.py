"""Per-plane admission: a local token bucket (clock injectable) and the overload answers."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from planemesh.netplanes.model import SLA


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
