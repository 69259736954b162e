"""The upstream side of one request, whatever its codecs (an Attempt, owned by exchange.Exchange for HTTP/1.x and
by h2_stream.Bridge for an h2 stream): endpoint choice, circuit-breaker holds, the upstream stream (an HTTP/1.1
connection of the UpstreamPool, or an h2_upstream.H2ClientStream for an http2 cluster), retries with back-off,
per-try and overall timeouts, and what a lost upstream means before a response started.

The Attempt owns this state; what it needs of the request it serves goes through contracts.AttemptOwner. It is
the user the upstream pool drives (contracts.PoolUser: connected, connect failed, overloaded); the upstream
stream's response events go to the owner's response relay (response.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.attempt_stage import (
    HELD_IN_PENDING,
    HELD_INBOUND,
    StageState,
    enter_stage,
    release_inbound,
    same_endpoint,
    stage_open,
)
from planemesh.agent.proxy.balancer import normalise_ip
from planemesh.agent.proxy.circuit import CONNECTIONS, PENDING, REQUESTS
from planemesh.agent.proxy.h2_support import open_h2_stream
from planemesh.agent.proxy.outlier import GATEWAY_FAILURE
from planemesh.agent.proxy.restage import ANSWERED, GO
from planemesh.agent.proxy.retry import NO_RETRIES, rng
from planemesh.agent.proxy.stage_retry import StagedRetries
from planemesh.model.config import ClusterKind

if TYPE_CHECKING:
    import asyncio

    from planemesh.agent.proxy.balancer import Balancer
    from planemesh.agent.proxy.circuit import CircuitBreaker
    from planemesh.agent.proxy.contracts import AttemptOwner, Fields, RequestSource
    from planemesh.agent.proxy.contracts import UpstreamStream as UpstreamConnection
    from planemesh.agent.proxy.pipeline import Upstream
    from planemesh.agent.proxy.retry import Retries
    from planemesh.model.config import Cluster, Endpoint

HELD_REQUEST, HELD_PENDING, HELD_CONNECTION = 1, 2, 4  # circuit breaker units an attempt holds
HELD_OPEN = HELD_PENDING | HELD_CONNECTION | HELD_INBOUND  # what an attempt still open holds (end() gives back)
MAX_STAGE_PICKS = 4  # a local client's retry: endpoints whose stage would change the head otherwise, passed over
_perf = time.perf_counter


class _Finished:
    """What an Attempt or a ResponseRelay sees of its request once the request is finished (its `ex`, and for an
    h2 stream its `ds`, set by the request's finish): late callbacks return at once, and no reference cycle is
    left for the cyclic GC, whose passes would otherwise grow with the request rate."""

    __slots__ = ()
    finished = True

    def flush(self) -> None:  # an upstream read that ended the request still flushes its client side
        pass


FINISHED = _Finished()


class Attempt:
    """The current upstream attempt of a request (endpoint, connection, breaker holds) and what carries over
    from one attempt to the next (retry state, deadlines, the back-off timer)."""

    __slots__ = (
        "backoff",
        "balancer",
        "breaker",
        "cb_held",
        "cluster",
        "conn",
        "connect_task",
        "connect_timeout_s",
        "deadline",
        "ds",
        "endpoint",
        "ex",
        "h2",
        "h2_fields",
        "hash_key",
        "inbound_hold",
        "local_client",
        "local_peer",
        "pending",
        "retries",
        "stage",
        "t_upstream",
        "try_deadline",
        "upstream_addr",
        "upstream_host",
        "upstream_key",
        "waiting",
    )

    def __init__(self, ex: AttemptOwner, ds: RequestSource | None = None) -> None:
        self.ex = ex
        self.ds = ex.ds if ds is None else ds  # `ds`: the owner's, given by an owner that knows it (an h2 stream)
        self.cluster: Cluster | None = None
        self.balancer: Balancer | None = None
        self.breaker: CircuitBreaker | None = None
        self.cb_held = 0
        self.inbound_hold: CircuitBreaker | None = None  # a local server's inbound cluster (pipeline.local_inbound)
        self.local_client: tuple | None = None  # a local client pod's request: (router, route config, ...)
        self.local_peer: str | None = None  # the client pod's SPIFFE ID once a local server stage applied
        self.stage: StageState | None = None  # what a local server pod's stage left to do (attempt_stage.local_stage)
        self.endpoint: Endpoint | None = None
        self.conn: UpstreamConnection | None = None
        self.connect_task = None
        self.connect_timeout_s = 5.0
        self.pending = False  # counted in the plane's requests_pending while connecting (upstream.UpstreamPool)
        self.backoff: asyncio.TimerHandle | None = None  # a retry's back-off
        self.retries: Retries = NO_RETRIES
        self.hash_key: int | None = None
        self.deadline = 0.0  # loop time; 0: no deadline
        self.try_deadline = 0.0
        self.t_upstream = 0.0
        self.upstream_addr: tuple[str, int] | None = None
        self.upstream_key: tuple | None = None
        self.upstream_host: str | None = None
        self.h2 = False  # the request goes upstream as an h2 stream (h2_upstream.H2ClientStream): an http2 cluster
        self.h2_fields: Fields | None = None
        self.waiting: tuple[tuple[str, int], bool] | None = None  # (target, reuse) while queued for a connection

    @property
    def finished(self) -> bool:
        return self.ex.finished

    # ---- endpoints and breaker holds ------------------------------------------------------------------

    def take_cluster(self, up: Upstream) -> tuple[str, int] | None:
        """The routed cluster (pipeline.upstream's answer, with a cluster): its breaker's REQUESTS unit, now held
        by this attempt, and the hash key; then the first endpoint (None: no healthy one)."""
        self.cluster = up.cluster
        self.breaker = up.breaker
        self.cb_held |= HELD_REQUEST
        self.hash_key = up.hash_key
        return self.pick()  # ORIGINAL_DST: the original destination

    def pick(self) -> tuple[str, int] | None:
        """The next endpoint of the request's cluster; the attempt on it is open until end()."""
        cluster = self.cluster
        assert cluster is not None and self.balancer is not None
        if cluster.kind is ClusterKind.ORIGINAL_DST:
            return normalise_ip(self.ds.local[0]), self.ds.local[1]
        ep = self.balancer.start_endpoint(cluster, self.hash_key)
        if ep is None:
            return None
        self.endpoint = ep
        return ep.address, ep.port

    def end(self, status: int) -> None:
        """The current attempt's outcome (HTTP status, 0 gateway failure, -1 none) for outlier detection."""
        if self.cb_held & HELD_INBOUND:
            release_inbound(self, HELD_INBOUND)
        breaker = self.breaker
        if breaker is not None:
            if self.waiting is not None:
                self._leave_queue()
            if self.cb_held & HELD_PENDING:
                breaker.release(PENDING)
            if self.cb_held & HELD_CONNECTION:
                breaker.release(CONNECTIONS)
            self.cb_held &= ~(HELD_PENDING | HELD_CONNECTION)
        ep = self.endpoint
        if ep is not None:
            self.endpoint = None
            self.balancer.report(self.cluster, ep, status)  # type: ignore[union-attr, arg-type]

    def start_clock(self, timeout_s: float, per_try_s: float, connect_timeout_s: float) -> None:
        """The route's overall and per-try deadlines (0: none) from now, watched by the proxy's sweep."""
        if timeout_s or per_try_s:
            proxy = self.ds.proxy
            now = proxy.loop.time()
            self.deadline = now + timeout_s if timeout_s else float("inf")
            self.try_deadline = min(self.deadline, now + per_try_s) if per_try_s else self.deadline
            proxy.watch_deadline(self)
        self.t_upstream = _perf()
        self.connect_timeout_s = connect_timeout_s

    def open(self, target: tuple[str, int], reuse: bool) -> None:
        """Open an attempt on `target` within the cluster's connection and pending limits (an h2 stream: those of
        the multiplexed connection it goes on, h2_upstream.H2Pool)."""
        if self.stage is not None and not stage_open(self, target, reuse):
            return None
        if self.h2:
            return open_h2_stream(self, target)
        breaker = self.breaker
        if breaker is not None:
            if not breaker.try_acquire(PENDING):
                self.end(-1)
                return self.ex.overloaded(b"cluster_pending")
            self.cb_held |= HELD_PENDING
            if not breaker.try_acquire(CONNECTIONS):  # every connection unit taken: wait for one, as Envoy's pool
                self.wait_for_connection(target, reuse)
                return None
            self.cb_held |= HELD_CONNECTION
        self._connect(target, reuse)

    def connection_granted(self) -> None:
        """The connection unit another attempt gave back is this waiting attempt's (circuit.CircuitBreaker):
        it goes on to its connection on the next loop pass, out of the giver's call stack."""
        self.cb_held |= HELD_CONNECTION
        self.ds.proxy.loop.call_soon(self._granted)

    def _granted(self) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None and not self.ex.finished:  # else end() has given the unit back meanwhile
            if self.h2:  # the unit goes to the stream's new connection (h2_upstream.H2Pool.open)
                open_h2_stream(self, waiting[0])
            else:
                self._connect(*waiting)

    def wait_for_connection(self, target: tuple[str, int], reuse: bool = False) -> None:
        """Wait, as a pending request, for a connection unit of the cluster's breaker (h2: or for a stream free on
        a connection to `target`, h2_upstream.H2Pool); the caller holds this attempt's PENDING unit."""
        self.waiting = (target, reuse)
        self.breaker.wait_for_connection(self)  # type: ignore[union-attr]

    def stop_waiting(self) -> bool:
        """No longer waiting (a stream came free for it): False when it was not waiting any more."""
        if self.waiting is None or self.ex.finished:
            return False
        self._leave_queue()
        return True

    def _leave_queue(self) -> None:
        self.waiting = None
        if not self.cb_held & HELD_CONNECTION:  # (granted: the breaker has let go of it already)
            self.breaker.stop_waiting(self)  # type: ignore[union-attr]

    def take_connection_unit(self) -> bool:
        """A max_connections unit for a new connection, which holds it from now on: the one handed to this
        attempt while it waited, else a fresh one (False: none left)."""
        if self.cb_held & HELD_CONNECTION:
            self.cb_held &= ~HELD_CONNECTION
            return True
        breaker = self.breaker
        return breaker is None or breaker.try_acquire(CONNECTIONS)

    def on_free_stream(self) -> None:
        """It goes on a stream of an established h2 connection: what it held to wait (pending units, a connection
        unit handed over meanwhile) goes back. One mask test for a stream that never waited."""
        if self.cb_held & (HELD_PENDING | HELD_IN_PENDING | HELD_CONNECTION):
            self.release_pending()
            self.give_back_connection_unit()

    def give_back_connection_unit(self) -> None:
        """A unit handed over while waiting, not needed after all (a stream came free on a connection)."""
        if self.cb_held & HELD_CONNECTION:
            self.cb_held &= ~HELD_CONNECTION
            self.breaker.release(CONNECTIONS)  # type: ignore[union-attr]

    def _connect(self, target: tuple[str, int], reuse: bool) -> None:
        pool = self.ds.proxy.pool
        if reuse:
            pool.acquire_for(self, target, self.connect_timeout_s)
        else:
            pool.connect_for(self, target, self.connect_timeout_s)

    def overloaded(self, which: bytes) -> None:
        self.ex.overloaded(which)

    def hold_pending(self) -> bool:
        """A PENDING unit of the cluster's breaker while the attempt waits for its connection (False: none left)."""
        breaker = self.breaker
        if breaker is None or self.cb_held & HELD_PENDING:  # (a stream that waited holds its unit already)
            return True
        if not breaker.try_acquire(PENDING):
            return False
        self.cb_held |= HELD_PENDING
        return True

    def release_pending(self) -> None:
        """The attempt's connection is established: it no longer waits for one."""
        if self.cb_held & HELD_IN_PENDING:
            release_inbound(self, HELD_IN_PENDING)
        if self.cb_held & HELD_PENDING:
            self.cb_held &= ~HELD_PENDING
            self.breaker.release(PENDING)  # type: ignore[union-attr]

    def on_connected(self, conn: UpstreamConnection) -> None:
        if self.cb_held & HELD_PENDING and not self.h2:  # an h2 stream waits until its connection is made
            self.cb_held &= ~HELD_PENDING
            self.breaker.release(PENDING)  # type: ignore[union-attr]
        if self.cb_held & HELD_IN_PENDING:  # a local server's inbound cluster's (its stream too)
            release_inbound(self, HELD_IN_PENDING)
        self.conn = conn
        conn.exchange = self.ex.relay  # the connection's response events
        ds = self.ds
        if ds.write_paused:  # the client is not reading (a pipelined request's turn came meanwhile)
            conn.pause_reading()
        self.ex.flush_upstream()
        ds.resume_for_buffer()

    def on_connect_failed(self, timed_out: bool) -> None:
        self.ds.proxy.stats.upstream_connect_failures += 1
        self.end(GATEWAY_FAILURE)
        if self.may_retry("connect-failure"):
            self.retry(reuse=True)
            return
        self.ex.reply(503, b"upstream connect error\n", (), self.exhausted(flags.UF))
        self.ds.flush()

    def drop(self) -> None:
        """Close the attempt's connection (a retry, a local answer, an abort)."""
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.exchange = None
            conn.close()

    def release(self) -> None:
        """The request is finished: give back every hold, stop every timer."""
        if self.deadline:
            self.ds.proxy.inflight.discard(self)
        self.connect_task = None  # the pool hands a late connection back to the idle list
        if self.pending:
            self.pending = False
            self.ds.proxy.stats.requests_pending -= 1
        if self.backoff is not None:
            self.backoff.cancel()
            self.backoff = None
        if self.endpoint is not None or self.cb_held & HELD_OPEN:
            self.end(-1)  # an attempt still open (its response had not begun)
        breaker = self.breaker
        if breaker is not None:
            if self.cb_held & HELD_REQUEST:
                breaker.release(REQUESTS)
            self.cb_held = 0
        if self.inbound_hold is not None:
            self.inbound_hold.release(REQUESTS)  # (its pending and connection units went with end())
            self.inbound_hold = None
        retries = self.retries
        if retries is not NO_RETRIES:
            retries.release()

    # ---- retries ------------------------------------------------------------------------------------

    def may_retry(self, condition: str, status: int = 0) -> bool:
        """Whether the retry policy covers this failure and a retry is still allowed."""
        return self.retries.may_retry(condition, status, self.ex.replayable())

    def exhausted(self, flag: str) -> str:
        """`flag`, plus URX when retries were configured and all were used."""
        return self.retries.exhausted(flag)

    def retry(self, reuse: bool = False) -> None:
        """Start the next attempt after a jittered back-off (the failed attempt has been ended)."""
        proxy = self.ds.proxy
        proxy.stats.retries += 1
        self.drop()
        self.ex.rearm()
        delay = self.retries.next_backoff(rng.random())
        if self.deadline:
            self.try_deadline = self.deadline  # no per-try clock runs during the back-off
        if delay < 0.001:
            self._next_attempt(reuse)
        else:
            self.backoff = proxy.loop.call_later(delay, self._next_attempt, reuse)

    def _next_attempt(self, reuse: bool) -> None:
        self.backoff = None
        ex = self.ex
        if ex.finished:
            return
        per_try = self.retries.policy.per_try_timeout_s
        if self.deadline and per_try:
            self.try_deadline = min(self.deadline, self.ds.proxy.loop.time() + per_try)
        target = self.next_target()
        if ex.finished:  # the stage of the pod picked answered (attempt_stage.enter_stage)
            self.ds.flush()
            return
        if target is None:
            ex.reply(503, b"no healthy upstream\n", (), flags.UF)
            self.ds.flush()
            return
        self.open(target, reuse)
        if ex.finished:
            self.ds.flush()

    def next_target(self) -> tuple[str, int] | None:
        """Where a retry goes: the cluster's next endpoint (the original destination stays the same); the same
        endpoint when the local server stage's own retry policy retries (StagedRetries)."""
        retries = self.retries
        if type(retries) is StagedRetries and retries.same_endpoint:
            retries.same_endpoint = False
            return same_endpoint(self)
        if self.cluster is not None and self.balancer is not None:
            picked = self.pick()
            tries = MAX_STAGE_PICKS
            while picked is not None and self.local_client is not None:
                verdict = enter_stage(self, picked)
                if verdict == ANSWERED:
                    return None  # the owner is finished: its caller sends nothing
                if verdict == GO:
                    break
                self.end(-1)  # not this endpoint: its stage would change the head the retry resends
                tries -= 1
                picked = self.pick() if tries else None
            if picked is None:
                return None
            self.upstream_addr = picked
            self.upstream_key = None
            if type(self.retries) is StagedRetries:  # the server stage's retries go to this endpoint from now on
                self.stage.endpoint = self.endpoint  # type: ignore[union-attr]
        return self.upstream_addr

    # ---- failures before a response started -----------------------------------------------------------

    def lost(self, conn: UpstreamConnection) -> None:
        """The upstream connection closed (or broke) before any response head."""
        ex = self.ex
        # A pooled connection the server had already closed: safe to try once more on a fresh one
        # when the request can be replayed; the retry policy's "reset" follows the same rule.
        if conn.reused and ex.replayable():
            self.end(-1)
            ex.rearm()
            target = self.next_target()
            if ex.finished:  # the stage of the pod picked answered
                self.ds.flush()
                return
            if self.stage is not None:
                self.stage.delay = None  # a replay on a fresh connection: no fault delay again
            self.ds.proxy.pool.connect_for(self, target or self.upstream_addr, self.connect_timeout_s)
            return
        self.end(GATEWAY_FAILURE)
        if self.may_retry("reset"):
            self.retry()
            return
        ex.reply(503, b"upstream connect error or disconnect/reset before headers\n", (), self.exhausted(flags.UC))
        self.ds.flush()

    def on_timeout(self, now: float) -> None:
        """Called by the proxy's deadline sweep once `try_deadline` has passed."""
        ex = self.ex
        if ex.finished:
            return
        if self.backoff is not None and now < self.deadline:
            self.try_deadline = self.deadline  # waiting to retry: only the overall deadline counts
            return
        self.ds.proxy.stats.upstream_timeouts += 1
        started = ex.relay.started
        outcome = -1 if self.waiting is not None else GATEWAY_FAILURE  # queued: the endpoint was never tried
        if now < self.deadline and not started and self.may_retry("timeout"):
            # Per-try timeout with retries left: a fresh attempt on a new connection, same overall deadline.
            self.end(outcome)
            self.retry()
            return
        self.end(outcome)
        self.deadline = self.try_deadline = float("inf")
        if started:
            ex.abort(flags.UT)
        else:
            ex.reply(504, b"upstream request timeout\n", (), self.exhausted(flags.UT))
        self.ds.flush()
