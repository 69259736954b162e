"""labs/open_loop.py: the open-loop probe's timing arithmetic. Latency runs from each request's due time, so a
stall counts in every request that fell due during it (not once, as a closed-loop client counts it); a request
never answered is an infinite latency; and the HTTP/1.1 answers are delimited or refused with a clear error."""

from __future__ import annotations

import math

import pytest

from planemesh.labs.open_loop import (
    LATE_MS,
    ProtocolError,
    ResponseReader,
    Schedule,
    Summary,
    Timeline,
    percentile,
    summarize,
)


def test_requests_fall_due_at_a_fixed_rate_round_robin_over_the_connections() -> None:
    s = Schedule(rate=1000.0, connections=4)
    assert [s.due(i) for i in (0, 1, 10)] == [0.0, 0.001, 0.01]
    assert s.count(2.0) == 2000 and s.count(0.0015) == 2 and s.count(0.002) == 2
    assert [s.connection(i) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert s.first(3) == 3 and s.following(3) == 7 and s.connection(s.following(3)) == 3
    with pytest.raises(ValueError, match="rate"):
        Schedule(0.0, 1)
    with pytest.raises(ValueError, match="connections"):
        Schedule(10.0, 0)


def _served(t: Timeline, service_s: float, stall: tuple[float, float] | None = None) -> None:
    """One connection, one request in flight: what an open-loop client records against a server answering in
    `service_s`, frozen over `stall` (start, end): nothing is answered inside it."""
    free = 0.0
    for i in range(len(t)):
        sent = max(t.due[i], free)
        done = sent + service_s
        if stall and stall[0] <= done < stall[1]:
            done = stall[1]
        t.mark_sent(i, sent, free)
        t.mark_done(i, done, 200)
        free = done


def test_a_stall_counts_in_every_request_due_during_it() -> None:
    t = Timeline(Schedule(1000.0, 1), 1.0)  # 1,000 requests, 1 ms apart, answered in 0.1 ms
    _served(t, 0.0001, stall=(0.5, 0.6))  # the server freezes for 100 ms half-way
    s = summarize(t)
    assert s.scheduled == s.answered == 1000 and s.no_answer == 0
    # The 100 requests due at 0.500 .. 0.599 wait for the stall's end, then go one at a time: request k of them
    # is answered at 0.6 + k * 0.1 ms, 100 - 0.9 k ms after it fell due; the backlog is gone ~11 ms later.
    assert s.late == 100 == sum(1 for i in range(1000) if t.latency(i) * 1000 > LATE_MS)
    assert s.max_ms == pytest.approx(100.0, abs=0.01)
    assert s.p99_ms == pytest.approx(100 - 0.9 * 10, abs=0.01)  # 990th of 1,000 (nearest rank), not 0.1 ms
    assert s.p999_ms == pytest.approx(100 - 0.9 * 1, abs=0.01)
    assert s.p50_ms == pytest.approx(0.1, abs=0.01)
    assert s.late_share == pytest.approx(0.1)
    # What a closed-loop client measures on the same answers (done - sent): one slow request, the rest fast.
    closed = sorted((t.done[i] - t.sent[i]) * 1000 for i in range(1000))
    assert sum(1 for x in closed if x > LATE_MS) == 1 and percentile(closed, 99) < 1.0


def test_a_request_never_answered_is_an_infinite_latency() -> None:
    t = Timeline(Schedule(100.0, 2), 1.0)
    for i in range(len(t)):
        t.mark_sent(i, t.due[i], t.due[i])
        if i % 50:  # 2 of 100 never answered
            t.mark_done(i, t.due[i] + 0.002, 200 if i % 7 else 503)
    s = summarize(t)
    assert (s.answered, s.no_answer, s.late) == (98, 2, 2)
    assert s.non_2xx == sum(1 for i in range(100) if i % 50 and not i % 7)
    assert math.isinf(s.p99_ms) and math.isinf(s.max_ms) and s.p50_ms == pytest.approx(2.0)
    raw = s.to_json_dict()
    assert raw["p99_ms"] is None and raw["p50_ms"] == pytest.approx(2.0)  # JSON has no infinity
    assert math.isinf(Summary.from_json_dict(raw).p999_ms)


def test_the_probes_own_lag_is_told_apart_from_waiting_for_the_server() -> None:
    t = Timeline(Schedule(100.0, 1), 0.03)  # due 0, 10, 20 ms
    t.mark_sent(0, 0.003, 0.0)  # due and free at 0, sent at 3 ms: the probe's own 3 ms
    t.mark_sent(1, 0.025, 0.025)  # free only at 25 ms (the server was slow): not the probe's lag
    t.mark_sent(2, 0.026, 0.026)
    assert [round(t.own_lag(i) * 1000, 6) for i in range(3)] == [3.0, 0.0, 0.0]
    assert summarize(t).own_lag_p99_ms == pytest.approx(3.0)


def test_percentile_is_nearest_rank() -> None:
    values = [float(x) for x in range(1, 1001)]
    assert percentile(values, 50) == 500.0 and percentile(values, 99) == 990.0
    assert percentile(values, 99.9) == 999.0 and percentile(values, 100) == 1000.0
    assert math.isnan(percentile([], 99))


def test_responses_are_delimited_across_reads() -> None:
    r = ResponseReader()
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 429 Too Many\r\ncontent-length: 0\r\n"
    got = r.feed(wire[:20]) + r.feed(wire[20:])
    assert [x.status for x in got] == [200]
    closing = r.feed(b"connection: close\r\n\r\n")
    assert [(x.status, x.closes) for x in closing] == [(429, True)]
    assert [x.status for x in r.feed(b"HTTP/1.1 204 No Content\r\n\r\n")] == [204]


@pytest.mark.parametrize(
    ("wire", "says"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "without content-length"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "content-length"),
        (b"HTTP/1.1 100 Continue\r\n\r\n", "interim"),
        (b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n", "colon"),
    ],
)
def test_an_answer_that_cannot_be_delimited_is_a_clear_error(wire: bytes, says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        ResponseReader().feed(wire)
