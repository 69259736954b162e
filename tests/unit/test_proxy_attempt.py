"""attempts.Attempt on its own (composition: it owns the upstream side's state and reaches its request only
through contracts.AttemptOwner): circuit-breaker holds taken and given back, a connect failure retried after a
back-off with the request re-armed, retries exhausted (URX), timeouts. No sockets: a recording pool and loop."""

from __future__ import annotations

from types import SimpleNamespace

from planemesh.agent.proxy.attempt_stage import StagedAttempt, StageState
from planemesh.agent.proxy.attempts import HELD_REQUEST, Attempt
from planemesh.agent.proxy.circuit import CONNECTIONS, PENDING, REQUESTS, RETRIES, CircuitBreaker
from planemesh.agent.proxy.pipeline import Delay
from planemesh.agent.proxy.retry import Retries
from planemesh.model.config import CircuitBreakers, RetryPolicy

TARGET = ("10.0.0.1", 8080)


class Owner:
    """A request, as an Attempt sees it (contracts.AttemptOwner), recording what the attempt asks of it."""

    def __init__(self, ds) -> None:
        self.ds = ds
        self.finished = False
        self.relay = SimpleNamespace(started=False)
        self.calls: list[tuple] = []

    def replayable(self) -> bool:
        return True

    def rearm(self) -> None:
        self.calls.append(("rearm",))

    def flush_upstream(self) -> None:
        self.calls.append(("flush_upstream",))

    def overloaded(self, which: bytes) -> None:
        self.calls.append(("overloaded", which))
        self.finished = True

    def reply(self, status: int, body: bytes, headers=(), flag: str = "") -> None:
        self.calls.append(("reply", status, flag))
        self.finished = True

    def abort(self, flag: str) -> None:
        self.calls.append(("abort", flag))
        self.finished = True


def _world():
    timers: list = []
    pool = SimpleNamespace(opened=[])
    pool.acquire_for = lambda user, addr, timeout: pool.opened.append(("acquire", addr))
    pool.connect_for = lambda user, addr, timeout: pool.opened.append(("connect", addr))
    loop = SimpleNamespace(time=lambda: 100.0, call_later=lambda d, fn, *a: timers.append((d, fn, a)) or object(),
                           call_soon=lambda fn, *a: timers.append((0, fn, a)))
    stats = SimpleNamespace(upstream_connect_failures=0, retries=0, upstream_timeouts=0, requests_pending=0)
    proxy = SimpleNamespace(pool=pool, loop=loop, stats=stats, inflight=set())
    ds = SimpleNamespace(proxy=proxy, write_paused=False, local=TARGET, flush=lambda: None,
                         resume_for_buffer=lambda: None)
    return ds, pool, timers


def _attempt(breaker: CircuitBreaker | None = None, policy: RetryPolicy | None = None):
    ds, pool, timers = _world()
    owner = Owner(ds)
    attempt = Attempt(owner)
    owner.attempt = attempt
    attempt.upstream_addr = TARGET
    if breaker is not None:
        breaker.try_acquire(REQUESTS)
        attempt.breaker = breaker
        attempt.cb_held |= HELD_REQUEST
    if policy is not None:
        attempt.retries = Retries(policy, breaker)
    return attempt, owner, pool, timers


def test_breaker_units_are_held_per_attempt_and_given_back() -> None:
    breaker = CircuitBreaker(CircuitBreakers(max_connections=1))
    first, owner, pool, _ = _attempt(breaker)
    first.open(TARGET, reuse=True)
    assert pool.opened == [("acquire", TARGET)]
    assert breaker.counts[CONNECTIONS] == 1 and breaker.counts[PENDING] == 1
    conn = SimpleNamespace(exchange=None, pause_reading=lambda: None)
    first.on_connected(conn)  # type: ignore[arg-type]
    assert conn.exchange is owner.relay and breaker.counts[PENDING] == 0  # the response goes to the relay
    second, owner2, pool2, soon = _attempt(breaker)
    second.open(TARGET, reuse=True)  # every connection unit taken: it waits as a pending request (Envoy's pool)
    assert owner2.calls == [] and pool2.opened == [] and list(breaker.waiters) == [second]
    assert breaker.counts[PENDING] == 1
    first.release()  # its connection unit goes to the waiting attempt, which connects on the next loop pass
    assert breaker.counts[CONNECTIONS] == 1 and not breaker.waiters and pool2.opened == []
    _, resume, args = soon.pop()
    resume(*args)
    assert pool2.opened == [("acquire", TARGET)]
    second.release()
    assert breaker.counts == {REQUESTS: 0, PENDING: 0, CONNECTIONS: 0, RETRIES: 0}


def test_a_waiting_attempt_overflows_pending_or_leaves_the_queue_holding_nothing() -> None:
    breaker = CircuitBreaker(CircuitBreakers(max_connections=1, max_pending_requests=1))
    first, *_ = _attempt(breaker)
    first.open(TARGET, reuse=True)
    first.on_connected(SimpleNamespace(exchange=None, pause_reading=lambda: None))  # type: ignore[arg-type]
    waiting, owner2, pool2, _ = _attempt(breaker)
    waiting.open(TARGET, reuse=True)
    third, owner3, pool3, _ = _attempt(breaker)
    third.open(TARGET, reuse=True)  # the one pending unit is the waiting attempt's
    assert owner3.calls == [("overloaded", b"cluster_pending")] and pool3.opened == []
    third.release()
    waiting.release()  # its client went away while it waited
    assert not breaker.waiters and breaker.counts[PENDING] == 0 and breaker.counts[CONNECTIONS] == 1
    assert owner2.calls == []  # nothing answered for it: its owner finished the request itself
    first.release()
    assert breaker.counts == {REQUESTS: 0, PENDING: 0, CONNECTIONS: 0, RETRIES: 0} and pool2.opened == []


def test_a_granted_attempt_that_finishes_before_it_connects_gives_the_unit_on() -> None:
    breaker = CircuitBreaker(CircuitBreakers(max_connections=1))
    first, *_ = _attempt(breaker)
    first.open(TARGET, reuse=True)
    second, _, pool2, soon2 = _attempt(breaker)
    second.open(TARGET, reuse=True)
    third, _, pool3, soon3 = _attempt(breaker)
    third.open(TARGET, reuse=True)
    first.release()  # the unit goes to `second` ...
    second.release()  # ... which finishes before its turn: the unit goes on to `third`
    for _, fn, args in soon2 + soon3:
        fn(*args)
    assert pool2.opened == [] and pool3.opened == [("acquire", TARGET)] and breaker.counts[CONNECTIONS] == 1
    third.release()
    assert breaker.counts == {REQUESTS: 0, PENDING: 0, CONNECTIONS: 0, RETRIES: 0}


def test_connect_failure_is_retried_after_a_back_off_then_exhausted() -> None:
    breaker = CircuitBreaker(CircuitBreakers())
    policy = RetryPolicy(retry_on=frozenset({"connect-failure"}), num_retries=1, backoff_base_s=0.5)
    attempt, owner, pool, timers = _attempt(breaker, policy)
    attempt.open(TARGET, reuse=True)
    attempt.on_connect_failed(False)
    assert ("rearm",) in owner.calls and breaker.counts[RETRIES] == 1
    if timers:  # a back-off was drawn (jittered: it may be under a millisecond, then the retry went at once)
        delay, fn, args = timers.pop()
        assert 0 <= delay <= 0.5
        fn(*args)
    assert pool.opened == [("acquire", TARGET), ("acquire", TARGET)]
    attempt.on_connect_failed(False)
    assert owner.calls[-1] == ("reply", 503, "UF,URX")
    attempt.release()
    assert breaker.counts == {REQUESTS: 0, PENDING: 0, CONNECTIONS: 0, RETRIES: 0}


def test_timeouts_before_and_after_the_response_started() -> None:
    attempt, owner, _, _ = _attempt()
    attempt.deadline = attempt.try_deadline = 99.0
    attempt.on_timeout(100.0)
    assert owner.calls == [("reply", 504, "UT")]
    attempt, owner, _, _ = _attempt()
    owner.relay.started = True
    attempt.deadline = attempt.try_deadline = 99.0
    attempt.on_timeout(100.0)
    assert owner.calls == [("abort", "UT")]  # mid-response: the client's connection closes


def test_a_local_server_stages_inbound_holds_are_given_back() -> None:
    """A local server pod's stage (attempt_stage.local_stage): its fault delay holds the attempt (a timer), then its
    inbound cluster's connection and pending units are held with the client's; every unit comes back whether
    the attempt ends, or the request is released with no endpoint and no client-cluster unit open (an h2
    stream to an ORIGINAL_DST cluster)."""
    ds, pool, timers = _world()
    attempt = Attempt(Owner(ds))
    inbound = CircuitBreaker(CircuitBreakers())
    assert inbound.try_acquire(REQUESTS)  # what pipeline.local_inbound took for the stage
    attempt.inbound_hold = inbound
    attempt.stage = StageState()
    attempt.stage.delay = Delay(0.25, None)
    attempt.open(TARGET, reuse=True)
    assert pool.opened == [] and [t[0] for t in timers] == [0.25]  # the delay first
    _delay, fn, args = timers[0]
    fn(*args)  # the delay has passed: the attempt opens, holding the inbound units
    assert pool.opened == [("acquire", TARGET)]
    assert inbound.counts[CONNECTIONS] == 1 and inbound.counts[PENDING] == 1
    attempt.h2, attempt.breaker = True, None  # as an h2 stream with no client-cluster unit of its own
    attempt.release()
    assert inbound.counts[CONNECTIONS] == 0 and inbound.counts[PENDING] == 0 and inbound.counts[REQUESTS] == 0


def test_the_stage_functions_use_only_what_an_attempt_has() -> None:
    """attempt_stage.StagedAttempt (the Protocol the stage's functions take instead of a mixin's host state) names
    only slots and methods Attempt has, so a renamed slot fails here rather than on a same-node request."""
    names = set(StagedAttempt.__annotations__) | {"end", "open"}
    missing = [n for n in names if n not in Attempt.__slots__ and not callable(getattr(Attempt, n, None))]
    assert not missing, missing
    assert Attempt.__mro__ == (Attempt, object)  # composed, not mixed in
