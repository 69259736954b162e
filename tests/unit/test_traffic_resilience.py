"""Outlier detection, circuit breakers, retry back-off, fault and rate limit filters, trace headers (pure)."""

from __future__ import annotations

import itertools
import re

import pytest

from planemesh.agent.proxy.circuit import PENDING, REQUESTS, RETRIES, CircuitBreaker
from planemesh.agent.proxy.exchange import backoff_s
from planemesh.agent.proxy.filters import NO_FAULT, FaultDecision, LocalRateLimiter, fault_decision
from planemesh.agent.proxy.mirror import shadow_head
from planemesh.agent.proxy.outlier import GATEWAY_FAILURE, OutlierDetector
from planemesh.agent.proxy.tracing import outgoing_trace_headers
from planemesh.model.config import CircuitBreakers, FaultFilter, LocalRateLimit, OutlierDetection, RetryPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- outlier detection -------------------------------------------------------------------------------

def test_consecutive_5xx_ejects_then_returns_with_backoff() -> None:
    clock = Clock()
    det = OutlierDetector(OutlierDetection(consecutive_5xx=3, base_ejection_time_s=10, max_ejection_percent=50),
                          host_count=2, clock=clock)
    assert [det.report("a", 500) for _ in range(3)] == [False, False, True]
    assert det.is_ejected("a") and not det.is_ejected("b")
    clock.now += 9.9
    assert det.is_ejected("a")
    clock.now += 0.2
    assert not det.is_ejected("a")  # back after base_ejection_time
    for _ in range(3):
        det.report("a", 503)
    clock.now += 19.9
    assert det.is_ejected("a")  # second ejection lasts twice as long
    clock.now += 0.2
    assert not det.is_ejected("a")


def test_success_resets_the_count() -> None:
    det = OutlierDetector(OutlierDetection(consecutive_5xx=2, max_ejection_percent=100), 1, Clock())
    assert not det.report("a", 500)
    det.report("a", 200)
    assert not det.report("a", 500)
    assert det.report("a", 500)


def test_gateway_failures_and_connect_errors() -> None:
    cfg = OutlierDetection(consecutive_5xx=100, consecutive_gateway_failure=2, max_ejection_percent=100)
    det = OutlierDetector(cfg, 1, Clock())
    assert not det.report("a", GATEWAY_FAILURE)
    assert det.report("a", 502)
    det2 = OutlierDetector(cfg, 1, Clock())
    det2.report("b", 502)
    det2.report("b", 500)  # a non-gateway 5xx breaks the gateway streak
    assert not det2.report("b", 504)


def test_max_ejection_percent_caps_ejections() -> None:
    det = OutlierDetector(OutlierDetection(consecutive_5xx=1, max_ejection_percent=50), 4, Clock())
    assert det.report("a", 500) and det.report("b", 500)
    assert not det.report("c", 500)  # 2 of 4 already out
    assert det.ejected_count() == 2


# ---- circuit breakers -----------------------------------------------------------------------------------

def test_circuit_breaker_counts_and_overflows() -> None:
    cb = CircuitBreaker(CircuitBreakers(max_requests=2, max_pending_requests=1, max_retries=0))
    assert cb.try_acquire(REQUESTS) and cb.try_acquire(REQUESTS)
    assert not cb.try_acquire(REQUESTS) and cb.overflows[REQUESTS] == 1
    cb.release(REQUESTS)
    assert cb.try_acquire(REQUESTS)
    assert cb.try_acquire(PENDING) and cb.is_open(PENDING)
    assert not cb.try_acquire(RETRIES)
    cb.release(RETRIES)  # never below zero
    assert cb.counts[RETRIES] == 0


# ---- retry back-off --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("retry", "roll", "expected"), [
    (1, 0.5, 0.0125), (2, 0.5, 0.025), (3, 0.999999, 0.1), (10, 1.0, 0.25), (1, 0.0, 0.0),
])
def test_backoff_is_jittered_exponential_and_capped(retry, roll, expected) -> None:
    policy = RetryPolicy(backoff_base_s=0.025, backoff_max_s=0.25)
    assert backoff_s(policy, retry, roll) == pytest.approx(expected, abs=1e-6)


# ---- fault filter -------------------------------------------------------------------------------------------

def rolls(*values: float):
    it = itertools.cycle(values)
    return lambda: next(it)


@pytest.mark.parametrize(("fault", "headers", "roll", "expected"), [
    (FaultFilter(abort_status=503, abort_percent=100), {}, 0.5, FaultDecision(None, 503)),
    (FaultFilter(abort_status=503, abort_percent=10), {}, 0.5, NO_FAULT),
    (FaultFilter(abort_status=503, abort_percent=10), {}, 0.05, FaultDecision(None, 503)),
    (FaultFilter(delay_s=0.2, delay_percent=100), {}, 0.99, FaultDecision(0.2, None)),
    (FaultFilter(delay_s=0.2, delay_percent=100, abort_status=500, abort_percent=100), {}, 0.0,
     FaultDecision(0.2, 500)),
    # Headers count only when header-controlled.
    (FaultFilter(), {"x-envoy-fault-abort-request": "418"}, 0.0, NO_FAULT),
    (FaultFilter(header_controlled=True), {"x-envoy-fault-abort-request": "418"}, 0.99, FaultDecision(None, 418)),
    (FaultFilter(header_controlled=True), {"x-envoy-fault-abort-request": "418",
                                           "x-envoy-fault-abort-request-percentage": "0"}, 0.0, NO_FAULT),
    (FaultFilter(header_controlled=True), {"x-envoy-fault-delay-request": "150"}, 0.5, FaultDecision(0.15, None)),
    # Malformed headers are ignored, never an error.
    (FaultFilter(header_controlled=True), {"x-envoy-fault-abort-request": "nope"}, 0.0, NO_FAULT),
    (FaultFilter(header_controlled=True), {"x-envoy-fault-abort-request": "99"}, 0.0, NO_FAULT),
    (FaultFilter(header_controlled=True), {"x-envoy-fault-delay-request": "-5"}, 0.0, NO_FAULT),
    (FaultFilter(header_controlled=True), {"x-envoy-fault-delay-request": "inf"}, 0.0, NO_FAULT),
    (FaultFilter(header_controlled=True), {"x-envoy-fault-delay-request": "9999999"}, 0.0,
     FaultDecision(60.0, None)),
])
def test_fault_decision(fault, headers, roll, expected) -> None:
    assert fault_decision(fault, headers, rolls(roll)) == expected


def test_fault_percentage_over_many_requests() -> None:
    import random
    rng = random.Random(11)
    fault = FaultFilter(abort_status=503, abort_percent=25)
    aborted = sum(fault_decision(fault, {}, rng.random).abort_status == 503 for _ in range(4000))
    assert 900 < aborted < 1100


# ---- local rate limit ---------------------------------------------------------------------------------------

def test_local_rate_limit_bucket_fills_by_interval() -> None:
    clock = Clock()
    rl = LocalRateLimiter(LocalRateLimit(max_tokens=3, tokens_per_fill=2, fill_interval_s=1.0), clock)
    assert [rl.take() for _ in range(4)] == [True, True, True, False]
    assert dict(rl.headers()) == {b"x-ratelimit-limit": b"3", b"x-ratelimit-remaining": b"0",
                                  b"x-ratelimit-reset": b"1"}
    clock.now += 0.99
    assert not rl.take()  # whole intervals only
    clock.now += 0.02
    assert [rl.take() for _ in range(3)] == [True, True, False]
    clock.now += 10  # never above max_tokens
    assert [rl.take() for _ in range(4)] == [True, True, True, False]


# ---- tracing ----------------------------------------------------------------------------------------------------

def fixed_bits():
    values = iter([0xABC, 0x1234, 0x5678, 0x9999])
    return lambda n: next(values)


def test_trace_started_when_absent() -> None:
    out = dict(outgoing_trace_headers({}, fixed_bits()))
    assert out[b"traceparent"] == b"00-" + b"%032x" % 0xABC + b"-" + b"%016x" % 0x1234 + b"-01"
    assert out[b"x-b3-traceid"] == b"%032x" % 0xABC and out[b"x-b3-spanid"] == b"%016x" % 0x1234
    assert b"x-b3-parentspanid" not in out and b"tracestate" not in out


@pytest.mark.parametrize(("sampling", "draw", "sampled"), [(0.0, 0, False), (1.0, 42_949_672, True),
                                                         (1.0, 42_949_673, False), (100.0, 2**32 - 1, True)])
def test_new_trace_sampled_by_the_listener_percentage(sampling, draw, sampled) -> None:
    """Envoy's random_sampling: a new trace is sampled when a 32-bit draw falls under the percentage."""
    values = iter([0xABC, 0x1234, draw])
    out = dict(outgoing_trace_headers({}, lambda n: next(values), sampling=sampling))
    assert out[b"traceparent"].endswith(b"-01" if sampled else b"-00")
    assert out[b"x-b3-sampled"] == (b"1" if sampled else b"0")
    values = iter([draw, 0xABC, 0x1234])  # an invalid context starts a new trace, drawn the same way
    out = dict(outgoing_trace_headers({"traceparent": "garbage"}, lambda n: next(values), sampling=sampling))
    assert out[b"traceparent"].endswith(b"-01" if sampled else b"-00")


def test_incoming_trace_keeps_its_decision_whatever_the_sampling() -> None:
    incoming = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    assert dict(outgoing_trace_headers(incoming, fixed_bits(), sampling=0.0))[b"x-b3-sampled"] == b"1"


def test_traceparent_keeps_trace_new_span_and_tracestate() -> None:
    incoming = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "a=1"}
    out = dict(outgoing_trace_headers(incoming, fixed_bits()))
    tp = out[b"traceparent"].decode()
    assert re.fullmatch(r"00-4bf92f3577b34da6a3ce929d0e0e4736-[0-9a-f]{16}-01", tp)
    assert tp.split("-")[2] != "00f067aa0ba902b7"
    assert out[b"tracestate"] == b"a=1" and out[b"x-b3-parentspanid"] == b"00f067aa0ba902b7"


def test_b3_only_request_continues_its_trace() -> None:
    incoming = {"x-b3-traceid": "463ac35c9f6413ad", "x-b3-spanid": "a2fb4a1d1a96d312", "x-b3-sampled": "0"}
    out = dict(outgoing_trace_headers(incoming, fixed_bits()))
    assert out[b"x-b3-traceid"] == b"0000000000000000463ac35c9f6413ad"
    assert out[b"traceparent"].endswith(b"-00") and out[b"x-b3-sampled"] == b"0"
    assert out[b"x-b3-parentspanid"] == b"a2fb4a1d1a96d312"


@pytest.mark.parametrize("bad", ["garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
                                 "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "00-xyz"])
def test_malformed_traceparent_starts_a_new_trace(bad) -> None:
    out = dict(outgoing_trace_headers({"traceparent": bad, "tracestate": "x=1"}, fixed_bits()))
    assert out[b"traceparent"].split(b"-")[1] == b"%032x" % 0xABC and b"tracestate" not in out


def test_shadow_head_suffixes_host_and_closes() -> None:
    head = b"GET /x HTTP/1.1\r\nhost: svc\r\nconnection: keep-alive\r\nx-a: 1\r\n\r\n"
    assert shadow_head(head) == b"GET /x HTTP/1.1\r\nhost: svc-shadow\r\nx-a: 1\r\nconnection: close\r\n\r\n"
