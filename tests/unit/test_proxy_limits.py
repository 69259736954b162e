"""Token bucket with an injected clock, and the sans-IO HTTP/1.1 helpers."""

from __future__ import annotations

import re

import pytest

from planemesh.agent.proxy.exchange import new_request_id
from planemesh.agent.proxy.http1 import HOP_BY_HOP, chunk, dropped_names, local_reply, status_line
from planemesh.agent.proxy.limits import TokenBucket, bucket_for, rate_limited_headers
from planemesh.agent.proxy.stats import PlaneStats
from planemesh.model.planes import SLA


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_burst_then_refill() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after_s() == 1
    clock.now += 0.5  # one token at 2/s
    assert bucket.take() and not bucket.take()
    clock.now += 100  # never more than the burst
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_bucket_from_sla() -> None:
    assert bucket_for(SLA()) is None
    bucket = bucket_for(SLA(rate_limit_rps=10), FakeClock())
    assert bucket is not None and bucket.burst == 10
    headers = dict(rate_limited_headers(bucket))
    assert headers[b"x-ratelimit-limit"] == b"10" and b"retry-after" in headers


@pytest.mark.parametrize(("values", "extra"), [
    ([b"close"], set()),
    ([b"keep-alive, X-Custom"], {b"x-custom"}),
    ([b"upgrade", b" foo ,bar"], {b"upgrade", b"foo", b"bar"}),
])
def test_connection_named_headers_are_dropped(values: list[bytes], extra: set[bytes]) -> None:
    assert dropped_names(values) == HOP_BY_HOP | extra


@pytest.mark.parametrize(("status", "body", "kwargs", "expected"), [
    (404, b"", {}, b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
    (204, b"", {}, b"HTTP/1.1 204 No Content\r\n\r\n"),
    (503, b"x\n", {"close": True},
     b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n"
     b"connection: close\r\n\r\nx\n"),
    (503, b"x\n", {"head_only": True},
     b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\n"),
    (301, b"", {"headers": [(b"location", b"/n")]},
     b"HTTP/1.1 301 Moved Permanently\r\ncontent-length: 0\r\nlocation: /n\r\n\r\n"),
])
def test_local_reply(status: int, body: bytes, kwargs: dict, expected: bytes) -> None:
    assert local_reply(status, body, **kwargs) == expected


def test_status_line_and_chunk() -> None:
    assert status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert status_line(299, b"Custom") == b"HTTP/1.1 299 Custom\r\n"
    assert chunk(b"a" * 26) == b"1a\r\n" + b"a" * 26 + b"\r\n"


def test_request_ids_are_uuid4_text() -> None:
    ids = {new_request_id().decode() for _ in range(1000)}
    assert len(ids) == 1000
    pattern = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
    assert all(pattern.fullmatch(i) for i in ids)


def test_stats_histogram() -> None:
    stats = PlaneStats()
    for ms in (0.1, 0.7, 3, 20000):
        stats.record_response(200, ms, 1, 2)
    stats.record_response(503, 1.0, 0, 0)
    d = stats.as_dict()
    assert d["responses"]["2xx"] == 4 and d["responses"]["5xx"] == 1
    buckets = d["latency_buckets"]
    assert buckets["0.5"] == 1 and buckets["1"] == 2 and buckets["5"] == 1 and buckets["+Inf"] == 1
    assert stats.bytes_rx == 4 and stats.bytes_tx == 8
