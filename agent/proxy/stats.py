"""Per-plane counters: plain ints bumped on the hot path, read by the admin endpoint."""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds of the latency buckets in milliseconds; the last bucket is +Inf.
LATENCY_BUCKETS_MS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class PlaneStats:
    __slots__ = (
        "bytes_rx",
        "bytes_tx",
        "downstream_active",
        "downstream_total",
        "h2_abuse_closed",
        "h2_premature_resets",
        "h2_provoked_resets",
        "h2_refused_streams",
        "idle_closed",
        "latency_buckets",
        "latency_count",
        "latency_sum_ms",
        "memory_bytes",
        "overload_level",
        "overload_resets",
        "overloaded",
        "rate_limited",
        "requests_active",
        "requests_pending",
        "requests_total",
        "response_flags",
        "responses",
        "retries",
        "shed_connections",
        "shed_requests",
        "source_refused",
        "upstream_active",
        "upstream_connect_failures",
        "upstream_timeouts",
        "upstream_total",
    )

    def __init__(self) -> None:
        self.requests_total = 0
        self.requests_active = 0
        self.requests_pending = 0  # waiting for an upstream connection
        self.responses = [0, 0, 0, 0, 0, 0]  # index = status // 100 (0: no response, e.g. client gone)
        self.response_flags: dict[str, int] = {}  # Envoy response flag (accesslog.UF, ...) -> responses
        self.downstream_active = 0
        self.downstream_total = 0
        self.upstream_active = 0
        self.upstream_total = 0
        self.upstream_connect_failures = 0
        self.upstream_timeouts = 0
        self.bytes_rx = 0  # request bodies received from clients
        self.bytes_tx = 0  # response bodies sent to clients
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.latency_count = 0
        self.latency_sum_ms = 0.0
        self.overloaded = 0
        self.rate_limited = 0
        self.retries = 0
        # Connection share and overload manager (agent/proxy/limits.py, overload.py)
        self.source_refused = 0  # connections refused: their address held its max_connections_per_source
        self.idle_closed = 0  # idle connections closed early (never used, or under pressure)
        self.shed_connections = 0  # new connections answered 503 (memory)
        self.shed_requests = 0  # requests answered 503 (memory)
        self.overload_resets = 0  # connections reset at the hard memory threshold
        self.overload_level = 0  # overload.Level of the worker: 0 normal, 1 soft, 2 hard
        self.memory_bytes = 0  # the worker's RSS at the last sample
        self.h2_premature_resets = 0  # streams a client reset before their response began (h2_guard.py)
        self.h2_provoked_resets = 0  # streams h2 reset for the client's protocol errors (MadeYouReset), premature too
        self.h2_refused_streams = 0  # beyond the connection's max concurrent streams
        self.h2_abuse_closed = 0  # connections closed with GOAWAY(ENHANCE_YOUR_CALM)

    def record_response(self, status: int, duration_ms: float, rx: int, tx: int, flags: str = "") -> None:
        if flags:  # rare (errors): "UF,URX" counts once for each flag
            for flag in flags.split(","):
                self.response_flags[flag] = self.response_flags.get(flag, 0) + 1
        cls = status // 100
        self.responses[cls if 0 <= cls < 6 else 0] += 1
        self.latency_buckets[bisect_left(LATENCY_BUCKETS_MS, duration_ms)] += 1
        self.latency_count += 1
        self.latency_sum_ms += duration_ms
        self.bytes_rx += rx
        self.bytes_tx += tx

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {name: getattr(self, name) for name in self.__slots__}
        out["response_flags"] = dict(self.response_flags)
        out["responses"] = {f"{i}xx" if i else "none": n for i, n in enumerate(self.responses)}
        out["latency_buckets"] = dict(
            zip([*map(str, LATENCY_BUCKETS_MS), "+Inf"], self.latency_buckets, strict=True)
        )
        return out
