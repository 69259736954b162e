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
from typing import TYPE_CHECKING, Any

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy import pipeline
from planemesh.agent.proxy.balancer import normalise_ip
from planemesh.agent.proxy.circuit import CONNECTIONS, PENDING, REQUESTS
from planemesh.agent.proxy.filters import DELAY_INJECTED
from planemesh.agent.proxy.h2_support import open_h2_stream
from planemesh.agent.proxy.local_mirrors import staged_mirrors
from planemesh.agent.proxy.outlier import GATEWAY_FAILURE
from planemesh.agent.proxy.restage import ANSWERED, GO, SKIP, same_head
from planemesh.agent.proxy.retry import NO_RETRIES, Retries, rng
from planemesh.agent.proxy.stage_retry import StagedRetries
from planemesh.model.config import ClusterKind

if TYPE_CHECKING:
    import asyncio

    from planemesh.agent.proxy.balancer import Balancer
    from planemesh.agent.proxy.circuit import CircuitBreaker
    from planemesh.agent.proxy.contracts import AttemptOwner, Fields, RequestSource
    from planemesh.agent.proxy.contracts import UpstreamStream as UpstreamConnection
    from planemesh.agent.proxy.pipeline import Delay, Headers, Local, Upstream
    from planemesh.agent.proxy.routing import CompiledRouteConfig, RouteResult
    from planemesh.model.config import Cluster, Endpoint

HELD_REQUEST, HELD_PENDING, HELD_CONNECTION = 1, 2, 4  # circuit breaker units an attempt holds
HELD_IN_PENDING, HELD_IN_CONNECTION = 8, 16  # the same of a local server's inbound cluster (Attempt.inbound_hold)
HELD_INBOUND = HELD_IN_PENDING | HELD_IN_CONNECTION
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


class StageState:
    """What a local server pod's stage leaves an Attempt to do: its fault delay before the attempt opens, the
    endpoint its own retries go back to, the x-forwarded-client-cert it sets (the codecs add it upstream)."""

    __slots__ = ("delay", "endpoint", "xfcc")

    def __init__(self, xfcc: bytes | None = None) -> None:
        self.delay: Delay | None = None
        self.endpoint: Endpoint | None = None
        self.xfcc = xfcc


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
        self.stage: StageState | None = None  # what a local server pod's stage left to do (Attempt.local_stage)
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

    def local_stage(self, crc: CompiledRouteConfig, result: RouteResult, authority: str, target: bytes,
                    headers: Headers, rbac_denied: Any, peer_ip: str = "") -> Local | RouteResult | None:
        """Step 6 for a local client pod's request on the endpoint just picked (pipeline.local_inbound, one call
        for both codecs), with the client pod's SPIFFE ID from the pod table as its principal: a Local answer
        (reported to the client's cluster as the endpoint's status, as the server's sidecar answering it would
        be), the chained RouteResult, or None. The attempt takes over the rest of the stage: the server's
        inbound cluster's request unit and its connection and pending limits (open), its fault delay (open),
        its route's retry policy (StagedRetries: the same endpoint first). A retry keeps to endpoints of the
        same stage."""
        proxy = self.ds.proxy
        router = proxy.table.router
        assert self.upstream_addr is not None
        principal = router.principal_of(crc, peer_ip) if peer_ip else None  # the client connection's source
        self.local_client = (router, crc, result, authority, target, headers, rbac_denied, principal)
        step = pipeline.local_inbound(proxy, crc, self.upstream_addr, result, authority, target, headers, rbac_denied,
                                      principal)  # fmt: skip
        if step is None:
            return None
        self.local_peer = principal  # what the server's sidecar would log and count as its peer
        if type(step) is pipeline.Local:
            self.end(step.status)
            return step
        stage = self.stage = StageState(router.local_xfcc_at(crc, self.upstream_addr, principal))
        if type(step) is pipeline.Staged:
            stage.delay = step.delay
            self.ex.flags = DELAY_INJECTED
            step = step.result
        self.inbound_hold = step.inbound_hold
        policy = step.inbound_retry
        if policy is not None and policy.num_retries > 0:
            self.retries = StagedRetries(Retries(policy, step.inbound_hold), self.retries)
            stage.endpoint = self.endpoint
        return step

    def local_mirrors(self, targets: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """A local client's mirror targets without the shadows a local pod's own stage would answer
        (local_mirrors.py); all of them for another client."""
        if self.local_client is None or not targets:
            return targets
        return staged_mirrors(self.ds.proxy, self.local_client, targets)

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
            self._release_inbound(HELD_INBOUND)
        breaker = self.breaker
        if breaker is not None:
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
        if self.stage is not None and not self._stage_open(target, reuse):
            return None
        if self.h2:
            return open_h2_stream(self, target)
        breaker = self.breaker
        if breaker is not None:
            if not breaker.try_acquire(CONNECTIONS):
                self.end(-1)
                return self.ex.overloaded(b"cluster_connections")
            self.cb_held |= HELD_CONNECTION
            if not breaker.try_acquire(PENDING):
                self.end(-1)
                return self.ex.overloaded(b"cluster_pending")
            self.cb_held |= HELD_PENDING
        pool = self.ds.proxy.pool
        if reuse:
            pool.acquire_for(self, target, self.connect_timeout_s)
        else:
            pool.connect_for(self, target, self.connect_timeout_s)

    def _stage_open(self, target: tuple[str, int], reuse: bool) -> bool:
        """A local server stage's part of opening an attempt: its fault delay first (pipeline.Staged: the
        attempt opens when it has passed; False), then its inbound cluster's connection and pending limits
        (refused: False, answered)."""
        stage = self.stage
        delay = stage.delay  # type: ignore[union-attr]
        if delay is not None:
            stage.delay = None  # type: ignore[union-attr]
            self.backoff = self.ds.proxy.loop.call_later(delay.delay_s, self._after_stage_delay, target, reuse,
                                                         delay.abort_status)  # fmt: skip
            return False
        inbound = self.inbound_hold
        return inbound is None or self._hold_inbound(inbound)

    def _after_stage_delay(self, target: tuple[str, int], reuse: bool, abort_status: int | None) -> None:
        self.backoff = None
        ex = self.ex
        if ex.finished:
            return
        if abort_status is not None:
            self.end(abort_status)
            ex.reply(abort_status, b"fault filter abort", (), pipeline.fault_abort(abort_status, delayed=True).flag)
        else:
            self.open(target, reuse)
        if ex.finished:
            self.ds.flush()

    def _hold_inbound(self, inbound: CircuitBreaker) -> bool:
        """The local server's inbound cluster's connection and pending limits (its sidecar's pool to its pod),
        held like the client cluster's; refused: 503 UO, which the client's cluster sees from the endpoint."""
        if inbound.try_acquire(CONNECTIONS):
            self.cb_held |= HELD_IN_CONNECTION
            if inbound.try_acquire(PENDING):
                self.cb_held |= HELD_IN_PENDING
                return True
            which = b"cluster_pending"
        else:
            which = b"cluster_connections"
        self.end(503)
        self.ex.overloaded(which)
        return False

    def _release_inbound(self, bits: int) -> None:
        inbound = self.inbound_hold
        held = self.cb_held & bits
        self.cb_held &= ~bits
        if inbound is not None:
            if held & HELD_IN_PENDING:
                inbound.release(PENDING)
            if held & HELD_IN_CONNECTION:
                inbound.release(CONNECTIONS)

    def overloaded(self, which: bytes) -> None:
        self.ex.overloaded(which)

    def hold_pending(self) -> bool:
        """A PENDING unit of the cluster's breaker while the attempt waits for its connection (False: none left)."""
        breaker = self.breaker
        if breaker is None:
            return True
        if not breaker.try_acquire(PENDING):
            return False
        self.cb_held |= HELD_PENDING
        return True

    def release_pending(self) -> None:
        """The attempt's connection is established: it no longer waits for one."""
        if self.cb_held & HELD_IN_PENDING:
            self._release_inbound(HELD_IN_PENDING)
        if self.cb_held & HELD_PENDING:
            self.cb_held &= ~HELD_PENDING
            self.breaker.release(PENDING)  # type: ignore[union-attr]

    def on_connected(self, conn: UpstreamConnection) -> None:
        if self.cb_held & HELD_PENDING and not self.h2:  # an h2 stream waits until its connection is made
            self.cb_held &= ~HELD_PENDING
            self.breaker.release(PENDING)  # type: ignore[union-attr]
        if self.cb_held & HELD_IN_PENDING:  # a local server's inbound cluster's (its stream too)
            self._release_inbound(HELD_IN_PENDING)
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
        if ex.finished:  # the stage of the pod picked answered (_enter_stage)
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
            return self._same_endpoint()
        if self.cluster is not None and self.balancer is not None:
            picked = self.pick()
            tries = MAX_STAGE_PICKS
            while picked is not None and self.local_client is not None:
                verdict = self._enter_stage(picked)
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

    def _same_endpoint(self) -> tuple[str, int] | None:
        """The server stage's retry: the endpoint of its pod again, counted open on the client's cluster as a
        new pick would be (the client's sidecar saw one attempt)."""
        ep = self.stage.endpoint if self.stage is not None else None
        if ep is not None and self.cluster is not None and self.balancer is not None:
            lb = self.balancer.lb(self.cluster)
            if lb.counts:
                lb.started(ep)
            self.endpoint = ep
        self.upstream_key = None
        return self.upstream_addr

    def _enter_stage(self, picked: tuple[str, int]) -> int:
        """A local client's retry to `picked`: when it is another local pod than the last attempt's, that pod's
        stage runs (restage.py): it answers (its RBAC, no route, an abort: ANSWERED, the owner replied), or
        the attempt takes over its holds, fault delay, retry policy and response header changes (GO), unless
        it would change the request head otherwise than the head being resent (SKIP). A remote endpoint or the
        same pod: GO."""
        router, crc, result, authority, target, headers, rbac_denied, principal = self.local_client  # type: ignore[misc]
        stage = router.local_inbound(crc, *picked)
        if stage is None or stage is router.local_inbound(crc, *self.upstream_addr):  # type: ignore[misc]
            return GO
        old = self.inbound_hold  # the last pod's request is over: its inbound request unit is given back first
        if old is not None:
            old.release(REQUESTS)
            self.inbound_hold = None
        step = pipeline.local_inbound(self.ds.proxy, crc, picked, result, authority, target, headers, rbac_denied,
                                      principal)  # fmt: skip
        if step is None:
            return GO
        if type(step) is pipeline.Local:
            self.end(step.status)
            self.ex.reply(step.status, step.body, step.headers, step.flag)
            return ANSWERED
        delay = None
        if type(step) is pipeline.Staged:
            delay, step = step.delay, step.result
        xfcc = router.local_xfcc(stage, principal)
        if not same_head(step.route, self.ex.route) or xfcc != (self.stage.xfcc if self.stage is not None else None):
            if step.inbound_hold is not None:
                step.inbound_hold.release(REQUESTS)
            if old is not None and old.try_acquire(REQUESTS):  # free again: the head's own stage keeps it
                self.inbound_hold = old
            return SKIP
        self.inbound_hold = step.inbound_hold
        if self.stage is None:
            self.stage = StageState()
        self.stage.delay = delay
        self.ex.route = step.route  # its response header changes
        retries = self.retries
        outer = retries.outer if type(retries) is StagedRetries else retries
        if type(retries) is StagedRetries:
            retries.inner.release()
        policy = step.inbound_retry
        has_retries = policy is not None and policy.num_retries > 0
        self.retries = StagedRetries(Retries(policy, step.inbound_hold), outer) if has_retries else outer  # type: ignore[arg-type]
        return GO

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
        if now < self.deadline and not started and self.may_retry("timeout"):
            # Per-try timeout with retries left: a fresh attempt on a new connection, same overall deadline.
            self.end(GATEWAY_FAILURE)
            self.retry()
            return
        self.end(GATEWAY_FAILURE)
        self.deadline = self.try_deadline = float("inf")
        if started:
            ex.abort(flags.UT)
        else:
            ex.reply(504, b"upstream request timeout\n", (), self.exhausted(flags.UT))
        self.ds.flush()
