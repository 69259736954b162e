"""The chaos test's verdict: a failed request is excused only by a fault of its own plane (or a node-wide
fault allowed to fail) that overlapped it, give or take the grace period."""

from __future__ import annotations

from tests.netns.chaos_client import ClientLog, Fault, Outcome, by_fault, unexplained


def log_with(plane: str, *spans: tuple[float, float]) -> ClientLog:
    log = ClientLog(plane)
    log.outcomes.append(Outcome(0.0, 0.1, 200))
    log.outcomes += [Outcome(a, b, None, "ConnectionResetError") for a, b in spans]
    return log


def test_an_error_inside_its_planes_fault_is_excused() -> None:
    faults = [Fault("kill9", "oam", 10.0, 11.0)]
    assert unexplained(log_with("oam", (10.5, 10.6), (13.0, 13.1)), faults, grace_s=3.0) == []


def test_an_error_after_the_grace_period_is_not() -> None:
    faults = [Fault("kill9", "oam", 10.0, 11.0)]
    stray = unexplained(log_with("oam", (14.5, 14.6)), faults, grace_s=3.0)
    assert [o.started for o, _ in stray] == [14.5]


def test_another_planes_fault_excuses_nothing() -> None:
    faults = [Fault("upstream", "media", 10.0, 12.0)]
    stray = unexplained(log_with("oam", (11.0, 11.1)), faults, grace_s=3.0)
    assert len(stray) == 1 and stray[0][1][0].startswith("upstream@media")


def test_node_wide_faults_that_must_not_fail_excuse_nothing() -> None:
    faults = [Fault("agent_restart", None, 10.0, 15.0, may_fail=False), Fault("push", None, 20.0, 21.0, may_fail=False)]
    log = log_with("media", (12.0, 12.1), (20.5, 20.5))
    assert len(unexplained(log, faults, grace_s=3.0)) == 2
    assert by_fault(log, faults, grace_s=3.0) == {"agent_restart": 1, "push": 1}


def test_a_request_that_spans_the_fault_is_covered() -> None:
    faults = [Fault("sigstop", "oam", 10.0, 12.0)]
    assert unexplained(log_with("oam", (8.0, 13.0)), faults, grace_s=0.0) == []
