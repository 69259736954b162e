"""The per-source connection share and idle deadlines (agent/proxy/limits.py), with a fake clock: issue 11
finding 7b (one pod's idle connections starved its own plane)."""

from __future__ import annotations

import pytest

from planemesh.agent.proxy.limits import PRESSURED_IDLE_TIMEOUT_S, ConnectionShare, per_source_limit
from planemesh.model.planes import SLA
from planemesh.model.validation import validate_snapshot


def test_default_share_is_a_quarter_of_the_budget() -> None:
    assert per_source_limit(SLA()) == 1024
    assert per_source_limit(SLA(max_connections=10)) == 2
    assert per_source_limit(SLA(max_connections=3)) == 1  # never zero
    assert per_source_limit(SLA(max_connections_per_source=7)) == 7


def test_one_source_gets_its_share_and_others_still_get_in() -> None:
    share = ConnectionShare(SLA(max_connections=8, max_connections_per_source=3))
    total = 0

    def admit(key: str, source: str) -> str | None:
        nonlocal total
        total += 1
        why = share.admit(key, source, 0.0, total)
        if why is not None:
            total -= 1
        return why

    assert [admit(f"a{i}", "10.0.0.1") for i in range(5)] == [None, None, None, "source", "source"]
    assert [admit(f"b{i}", "10.0.0.2") for i in range(3)] == [None, None, None]
    assert admit("c0", "10.0.0.3") is None and admit("c1", "10.0.0.3") is None
    assert admit("d0", "10.0.0.4") == "connections"  # the plane's total comes first
    assert share.by_source == {"10.0.0.1": 3, "10.0.0.2": 3, "10.0.0.3": 2}
    share.release("a0")
    share.release("a0")  # twice: harmless
    share.release("never-admitted")
    total -= 1
    assert admit("a9", "10.0.0.1") is None
    for key in ("a1", "a2", "a9"):
        share.release(key)
    assert "10.0.0.1" not in share.by_source and len(share) == 5


def test_idle_deadlines_with_a_fake_clock() -> None:
    share = ConnectionShare(SLA(idle_connection_timeout_s=10.0))
    share.admit("silent", "10.0.0.1", 100.0, 1)
    share.admit("used", "10.0.0.1", 100.0, 2)
    keepalive = 300.0
    # Never sent a byte: closed after idle_connection_timeout_s.
    assert not share.idle_expired("silent", 100.0, 109.0, keepalive, pressure=False)
    assert share.idle_expired("silent", 100.0, 110.5, keepalive, pressure=False)
    # Sent a request (a byte after it was accepted): the SLA's keep-alive idle timeout applies.
    assert not share.idle_expired("used", 100.5, 200.0, keepalive, pressure=False)
    assert share.idle_expired("used", 100.5, 401.0, keepalive, pressure=False)
    # Under pressure every idle connection gets the short timeout.
    assert not share.idle_expired("used", 100.5, 100.5 + PRESSURED_IDLE_TIMEOUT_S / 2, keepalive, pressure=True)
    assert share.idle_expired("used", 100.5, 101.0 + PRESSURED_IDLE_TIMEOUT_S, keepalive, pressure=True)
    assert share.idle_expired("silent", 100.0, 101.0 + PRESSURED_IDLE_TIMEOUT_S, keepalive, pressure=True)


def test_never_used_timeout_zero_means_none() -> None:
    share = ConnectionShare(SLA(idle_connection_timeout_s=0))
    share.admit("silent", "10.0.0.1", 0.0, 1)
    assert not share.idle_expired("silent", 0.0, 299.0, 300.0, pressure=False)


def test_pressure_is_above_three_quarters_of_the_budget() -> None:
    share = ConnectionShare(SLA(max_connections=100))
    assert not share.pressured(75) and share.pressured(76)


def test_reconfigure_keeps_admitted_connections() -> None:
    share = ConnectionShare(SLA(max_connections=8, max_connections_per_source=2))
    assert share.admit("a", "s", 0.0, 1) is None and share.admit("b", "s", 0.0, 2) is None
    share.configure(SLA(max_connections=8, max_connections_per_source=1))
    assert share.admit("c", "s", 0.0, 3) == "source"
    assert share.by_source == {"s": 2}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("memory_max_mb", 0, "must be >= 1"), ("max_connections_per_source", 0, "must be >= 1")],
)
def test_bad_sla_values_are_refused(field: str, value: int, message: str) -> None:
    from dataclasses import replace

    from tests.proxy.proxy_harness import make_snapshot

    snap = make_snapshot(15001, [("127.0.0.1", 1)])
    plane = replace(snap.planes[0], sla=SLA(**{field: value}))
    with pytest.raises(Exception, match=message) as err:
        validate_snapshot(replace(snap, planes=(plane,)))
    assert field in str(err.value)
