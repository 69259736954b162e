"""Open-loop latency, the arithmetic (sans-IO): when each request is due, what its latency is, what a run sums to.

A closed-loop client (wrk) sends a connection's next request when the previous answer arrives: while the server
stalls, the requests that a real user would have sent meanwhile are never sent, so the stall is counted once,
in one sample (coordinated omission). An open-loop probe offers a fixed rate whatever the server does: request i
is due at `i / rate` seconds after the start, and its latency is measured from that due time, not from when it
could be sent, so a stall counts in every request that fell due during it (wrk2's model).

Requests are spread round-robin over `connections` HTTP/1.1 keep-alive connections, one in flight each:
connection c carries requests c, c + C, c + 2C, ... A request whose connection is still busy goes out as soon
as the connection is free, late, and that wait is part of its latency. A request never answered (the run's
deadline passed, the connection broke) has an infinite latency: it is in every percentile above its rank.
labs/open_loop_client.py drives this over sockets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

LATE_MS = 10.0  # a request answered more than this after its due time missed its schedule
INF = math.inf


@dataclass(frozen=True)
class Schedule:
    rate: float  # requests per second, all connections together
    connections: int

    def __post_init__(self) -> None:
        if not self.rate > 0 or not math.isfinite(self.rate):
            raise ValueError(f"rate must be a positive number of requests per second, got {self.rate!r}")
        if self.connections < 1:
            raise ValueError(f"connections must be at least 1, got {self.connections!r}")

    def due(self, index: int) -> float:
        """Seconds after the start at which request `index` is due."""
        return index / self.rate

    def count(self, seconds: float) -> int:
        """How many requests fall due in [0, seconds)."""
        return max(0, math.ceil(seconds * self.rate - 1e-9))

    def connection(self, index: int) -> int:
        return index % self.connections

    def first(self, connection: int) -> int:
        return connection

    def following(self, index: int) -> int:
        """The next request on the same connection."""
        return index + self.connections


class Timeline:
    """Per request: due, sent and answered times (seconds from the start; NaN: not yet / never) and the HTTP
    status (0: no answer). `free_at` is when the request's connection became free for it, so the probe's own lag
    (it was free, the request was due, and it still went out later) is told apart from waiting for the server."""

    def __init__(self, schedule: Schedule, seconds: float) -> None:
        self.schedule = schedule
        self.seconds = seconds
        n = schedule.count(seconds)
        self.due = [schedule.due(i) for i in range(n)]
        self.sent = [math.nan] * n
        self.free_at = [math.nan] * n
        self.done = [math.nan] * n
        self.status = [0] * n

    def __len__(self) -> int:
        return len(self.due)

    def mark_sent(self, index: int, now: float, free_at: float) -> None:
        self.sent[index], self.free_at[index] = now, free_at

    def mark_done(self, index: int, now: float, status: int) -> None:
        self.done[index], self.status[index] = now, status

    def latency(self, index: int) -> float:
        """Seconds from due to answered; infinite when it was never answered."""
        done = self.done[index]
        return INF if math.isnan(done) else done - self.due[index]

    def own_lag(self, index: int) -> float:
        """Seconds the probe itself was late: sent after both its due time and its connection's freedom."""
        sent = self.sent[index]
        return 0.0 if math.isnan(sent) else max(0.0, sent - max(self.due[index], self.free_at[index]))


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in (0, 100]); NaN for no values."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q * len(ordered) / 100 - 1e-9))  # 99.9 * 1000 / 100 is 999.0000000000001
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Summary:
    rate: float  # offered, req/s
    connections: int
    seconds: float
    scheduled: int  # requests that fell due
    answered: int
    no_answer: int  # never answered (deadline, broken connection): infinite latency
    non_2xx: int
    p50_ms: float  # from due time; inf when more than (100 - q)% got no answer
    p99_ms: float
    p999_ms: float
    max_ms: float
    late: int  # answered more than LATE_MS after due, or never
    own_lag_p99_ms: float  # the probe's own lateness (a figure about the probe, not the server)
    cpu_s: float = 0.0  # the probe's own user+sys CPU seconds over the run
    broken: int = 0  # connections that broke (reset, EOF, an answer this probe cannot read) and were reopened
    error: str = ""  # the last such break, as text

    @property
    def late_share(self) -> float:
        return self.late / self.scheduled if self.scheduled else 0.0

    @property
    def achieved_rps(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def to_json_dict(self) -> dict:
        # JSON has no infinity: a percentile that fell on a request with no answer is null
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json_dict(cls, raw: dict) -> Summary:
        fields = {k: (INF if v is None and k.endswith("_ms") else v) for k, v in raw.items()}
        return cls(**fields)


def summarize(
    timeline: Timeline, late_ms: float = LATE_MS, cpu_s: float = 0.0, broken: int = 0, error: str = ""
) -> Summary:
    n = len(timeline)
    latencies = sorted(timeline.latency(i) for i in range(n))
    answered = sum(1 for s in timeline.status if s)
    lags = sorted(timeline.own_lag(i) for i in range(n))
    ms = [x * 1000.0 for x in latencies]
    return Summary(
        rate=timeline.schedule.rate,
        connections=timeline.schedule.connections,
        seconds=timeline.seconds,
        scheduled=n,
        answered=answered,
        no_answer=n - answered,
        non_2xx=sum(1 for s in timeline.status if s and not 200 <= s < 300),
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        p999_ms=percentile(ms, 99.9),
        max_ms=ms[-1] if ms else math.nan,
        late=sum(1 for x in ms if x > late_ms),
        own_lag_p99_ms=percentile(lags, 99) * 1000.0 if lags else math.nan,
        cpu_s=cpu_s,
        broken=broken,
        error=error,
    )


class ProtocolError(ValueError):
    """The server's answer is not an HTTP/1.1 response this probe can delimit."""


@dataclass(frozen=True)
class Response:
    status: int
    closes: bool  # the server closes the connection after it (connection: close or HTTP/1.0)


class ResponseReader:
    """HTTP/1.1 responses on one connection, delimited by content-length (what nginx, the agent and Envoy send
    for a static file and for their local replies); a response without one cannot be delimited: an error."""

    MAX_HEAD = 64 * 1024

    def __init__(self) -> None:
        self.buf = bytearray()
        self.head: Response | None = None
        self.body_left = 0

    def feed(self, data: bytes) -> list[Response]:
        self.buf += data
        out: list[Response] = []
        while True:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > self.MAX_HEAD:
                        raise ProtocolError(f"response head over {self.MAX_HEAD} bytes")
                    return out
                self.head, self.body_left = _parse_head(bytes(self.buf[:end]))
                del self.buf[: end + 4]
            if len(self.buf) < self.body_left:
                return out
            del self.buf[: self.body_left]
            out.append(self.head)
            self.head, self.body_left = None, 0


def _parse_head(head: bytes) -> tuple[Response, int]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    status = int(parts[1])
    if status < 200:
        raise ProtocolError(f"interim response {status}: this probe sends nothing that asks for one")
    length: int | None = None
    closes = parts[0] == b"HTTP/1.0"
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ProtocolError(f"header line without a colon: {line[:80]!r}")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            if not value.isdigit():
                raise ProtocolError(f"content-length not a number: {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            raise ProtocolError("transfer-encoding responses are not read by this probe (content-length only)")
        elif name == b"connection":
            closes = b"close" in value or (closes and b"keep-alive" not in value)
    if length is None:
        if status in (204, 304):
            length = 0
        else:
            raise ProtocolError(f"status {status} without content-length: cannot delimit the body")
    return Response(status, closes), length
