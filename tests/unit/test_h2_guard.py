"""The HTTP/2 abuse accounting (agent/proxy/h2_guard.py) with a fake clock: each limit trips where Envoy's does,
and well-behaved patterns (a gRPC client cancelling some streams, a downloader's WINDOW_UPDATEs, keepalive
PINGs) never do."""

from __future__ import annotations

import pytest

from planemesh.agent.proxy import h2_guard
from planemesh.agent.proxy.h2_guard import H2Guard, H2Limits
from planemesh.model.planes import SLA

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def guard(**limits: object) -> tuple[H2Guard, Clock]:
    clock = Clock()
    return H2Guard(H2Limits(**limits), clock), clock  # type: ignore[arg-type]


def rapid_resets(g: H2Guard, n: int) -> int | None:
    """Open and reset n streams at once; the stream count at which the guard said stop, or None."""
    for i in range(1, n + 1):
        g.stream_opened()
        if g.stream_closed(g.clock(), responded=False, reset_by_client=True) is not None:
            return i
    return None


def test_rapid_reset_closes_at_half_the_total_stream_count() -> None:
    g, _ = guard()
    assert rapid_resets(g, 10_000) == 250  # Envoy: premature resets >= 500 / 2


def test_grpc_client_cancelling_a_third_of_its_streams_is_never_closed() -> None:
    g, clock = guard()
    for i in range(20_000):
        g.stream_opened()
        start = clock.now
        clock.now += 0.001
        cancelled = i % 3 == 0  # a deadline or a hedged call: reset before the response
        assert g.stream_closed(start, responded=not cancelled, reset_by_client=cancelled) is None


def test_resets_after_the_minimum_lifetime_or_after_a_response_are_not_premature() -> None:
    g, clock = guard()
    for _ in range(5000):
        g.stream_opened()
        start = clock.now
        clock.now += 1.5  # a long stream the client then cancels (a watch, a server stream)
        assert g.stream_closed(start, responded=False, reset_by_client=True) is None
    for _ in range(5000):
        assert g.stream_closed(clock.now, responded=True, reset_by_client=True) is None
    assert g.premature == 0


def test_majority_of_premature_resets_past_the_total_count_closes() -> None:
    g, clock = guard()
    for _ in range(600):  # a good history first
        assert g.stream_closed(clock.now, responded=True, reset_by_client=False) is None
    assert rapid_resets(g, 10_000) == 600  # premature * 2 >= closed streams (600 good + 600 reset)


def test_consecutive_empty_frames() -> None:
    g, _ = guard()
    assert g.payload_frame(True) is None  # one is allowed (Envoy's default 1)
    assert g.payload_frame(False) is None
    assert g.payload_frame(True) is None
    assert g.payload_frame(True) == h2_guard.EMPTY_FRAMES


def test_priority_frames_per_stream() -> None:
    g, _ = guard()
    assert all(g.priority_frame() is None for _ in range(100))
    assert g.priority_frame() == h2_guard.PRIORITY
    g, _ = guard()
    for _ in range(3):
        g.stream_opened()
    assert all(g.priority_frame() is None for _ in range(400))
    assert g.priority_frame() == h2_guard.PRIORITY


def test_window_updates_are_allowed_in_proportion_to_data_sent() -> None:
    g, _ = guard()
    g.stream_opened()
    assert all(g.window_update_frame(0) is None for _ in range(7))  # 5 + 2 * 1 stream
    assert g.window_update_frame(0) == h2_guard.WINDOW_UPDATE
    g, _ = guard()
    g.stream_opened()
    for sent in range(1, 10_000):  # a downloader: a stream and a connection WINDOW_UPDATE per DATA frame
        assert g.window_update_frame(sent) is None
        assert g.window_update_frame(sent) is None


def test_outbound_control_frames_count_only_while_the_client_does_not_read() -> None:
    g, _ = guard(max_control_frames_per_s=10**9)
    assert all(g.control_frame(write_pending=False) is None for _ in range(50_000))
    assert all(g.control_frame(write_pending=True) is None for _ in range(1000))
    g.write_drained()  # the client read everything
    assert all(g.control_frame(write_pending=True) is None for _ in range(1000))
    assert g.control_frame(write_pending=True) == h2_guard.OUTBOUND_CONTROL


def test_control_frame_rate() -> None:
    g, clock = guard()
    for _ in range(3):  # a client pinging 5,000 times a second for 3 s is left alone
        for _ in range(5000):
            clock.now += 0.0002
            assert g.control_frame(False) is None
    found = None
    for i in range(20_000):  # a flood: 100k a second
        clock.now += 0.00001
        if g.control_frame(False) is not None:
            found = i
            break
    # fixed one-second windows: at most two windows' worth, i.e. well within a second at this rate
    assert found is not None and found <= 2 * h2_guard.MAX_INBOUND_CONTROL_FRAMES_PER_S


def test_concurrent_streams_and_buffer_budget() -> None:
    g, _ = guard(max_concurrent_streams=2, buffer_limit_bytes=1 << 20)
    assert g.may_open(0) and g.may_open(1) and not g.may_open(2)
    assert g.may_read()
    g.readers = 15  # a read each may bring READ_RESERVE: 16 readers fill a 1 MiB budget
    assert g.may_read()
    g.readers = 16
    assert not g.may_read()
    g.readers, g.buffered = 1, (1 << 20) - 1
    assert not g.over_budget() and not g.may_read()
    g.readers = 0  # one reader at least while the budget is not full
    assert g.may_read()
    g.buffered = 1 << 20
    assert g.over_budget() and not g.may_read()
    small, _ = guard(buffer_limit_bytes=16384)  # a budget below one read still lets one upstream be read
    assert small.may_read()


def test_limits_from_the_sla() -> None:
    sla = SLA(h2_max_concurrent_streams=7, buffer_limit_bytes=65536, h2_premature_reset_total_stream_count=40)
    limits = H2Limits.from_sla(sla)
    assert (limits.max_concurrent_streams, limits.buffer_limit_bytes, limits.premature_reset_total) == (7, 65536, 40)
    assert H2Limits.from_sla(sla) is limits  # memoised per SLA object
    assert H2Limits.from_sla(SLA()) == H2Limits()  # the SLA's defaults are the guard's
