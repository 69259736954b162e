"""The worker control channel's request table: replies matched by id, late replies dropped, stalls measured."""

from __future__ import annotations

import pytest

from planemesh.agent.worker_channel import ChannelError, RequestTable


def test_reply_matches_its_request_by_id() -> None:
    table = RequestTable()
    stats = table.new("stats", now=0.0)
    assert table.reply({"op": "stats", "id": stats, "stats": {}}) == stats
    assert table.stalled_for(now=5.0) == 0.0


def test_late_reply_to_an_abandoned_request_is_dropped_not_taken_for_the_next_answer() -> None:
    # The finding: a stats poll timed out, its reply came late and was read as the snapshot's "applied".
    table = RequestTable()
    stats = table.new("stats", now=0.0)
    table.abandon(stats)  # the poller gave up after 2 s
    snap = table.new("applied", now=3.0)
    assert table.reply({"op": "stats", "id": stats}) is None
    assert table.dropped == 1
    assert table.reply({"op": "applied", "id": snap}) == snap


def test_many_late_replies_are_drained_in_order() -> None:
    table = RequestTable()
    polls = [table.new("stats", now=float(i)) for i in range(6)]
    for rid in polls:
        table.abandon(rid)
    snap = table.new("applied", now=6.0)
    results = [table.reply({"op": "stats", "id": rid}) for rid in polls]
    assert results == [None] * 6
    assert table.reply({"op": "applied", "id": snap}) == snap
    assert table.dropped == 6


def test_a_reply_settles_older_requests_whose_replies_cannot_come_any_more() -> None:
    table = RequestTable()
    lost = table.new("stats", now=0.0)
    table.abandon(lost)
    newer = table.new("stats", now=1.0)
    assert table.reply({"op": "stats", "id": newer}) == newer
    assert table.stalled_for(now=10.0) == 0.0
    with pytest.raises(ChannelError):
        table.reply({"op": "stats", "id": lost})


@pytest.mark.parametrize(
    "reply",
    [
        {"op": "applied"},  # no id: an old worker or a bug
        {"op": "applied", "id": "1"},
        {"op": "applied", "id": 99},  # answers nothing that was asked
        {"op": "stats", "id": 1},  # wrong kind for request 1
    ],
)
def test_a_reply_that_answers_nothing_asked_is_a_protocol_error(reply: dict) -> None:
    table = RequestTable()
    table.new("applied", now=0.0)
    with pytest.raises(ChannelError):
        table.reply(reply)


def test_stall_counts_abandoned_requests_until_the_worker_answers() -> None:
    table = RequestTable()
    first = table.new("stats", now=0.0)
    table.abandon(first)
    table.new("stats", now=2.5)
    assert table.stalled_for(now=4.0) == 4.0  # the oldest unanswered one, even though nobody waits for it
    assert table.waiting("stats") and not table.waiting("applied")
    assert table.reply({"op": "stats", "id": first}) is None
    assert table.stalled_for(now=4.0) == 1.5


def test_close_returns_only_the_live_requests() -> None:
    table = RequestTable()
    gone = table.new("stats", now=0.0)
    table.abandon(gone)
    live = table.new("applied", now=0.0)
    assert table.close() == [live]
    assert table.stalled_for(now=9.0) == 0.0
