"""The upstream attempts of one request: endpoint choice, circuit-breaker holds, connecting, retries with
back-off, timeouts, and what a lost upstream connection means. A mixin of Exchange (exchange.py), whose
__slots__ hold the state used here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.balancer import normalise_ip
from planemesh.agent.proxy.circuit import CONNECTIONS, PENDING
from planemesh.agent.proxy.h1_over_h2 import open_h2_attempt
from planemesh.agent.proxy.http1 import FRAME_CHUNKED, FRAME_CLOSE, LAST_CHUNK, chunk
from planemesh.agent.proxy.outlier import GATEWAY_FAILURE
from planemesh.agent.proxy.retry import rng
from planemesh.model.config import ClusterKind

if TYPE_CHECKING:
    import asyncio

    from planemesh.agent.proxy.balancer import Balancer
    from planemesh.agent.proxy.circuit import CircuitBreaker
    from planemesh.agent.proxy.contracts import ClientConn as Downstream
    from planemesh.agent.proxy.contracts import UpstreamConn as UpstreamConnection
    from planemesh.agent.proxy.retry import Retries
    from planemesh.model.config import Cluster, Endpoint

HELD_REQUEST, HELD_PENDING, HELD_CONNECTION = 1, 2, 4  # circuit breaker units an exchange holds


class UpstreamAttempts:
    __slots__ = ()
    # Declared by Exchange's __slots__:
    ds: Downstream
    cluster: Cluster | None
    balancer: Balancer | None
    breaker: CircuitBreaker | None
    endpoint: Endpoint | None
    conn: UpstreamConnection | None
    backoff: asyncio.TimerHandle | None
    body_copy: list[bytes] | None
    up_out: list[bytes]
    upstream_addr: tuple[str, int] | None
    upstream_key: tuple | None
    cb_held: int
    retries: Retries
    hash_key: int | None
    connect_timeout_s: float
    deadline: float
    try_deadline: float
    finished: bool
    body_streamed: bool
    resp_started: bool
    up_framing: int
    ds_framing: int
    req_chunked: bool
    req_done: bool
    keep_alive: bool
    head: bytes
    flags: str
    h2: bool

    def _pick(self) -> tuple[str, int] | None:
        """The next endpoint of the request's cluster; the attempt on it is open until _end_attempt()."""
        cluster = self.cluster
        assert cluster is not None and self.balancer is not None
        if cluster.kind is ClusterKind.ORIGINAL_DST:
            return normalise_ip(self.ds.local[0]), self.ds.local[1]
        ep = self.balancer.pick_endpoint(cluster, self.hash_key)
        if ep is None:
            return None
        self.balancer.lb(cluster).started(ep)
        self.endpoint = ep
        return ep.address, ep.port

    def _end_attempt(self, status: int) -> None:
        """The current attempt's outcome (HTTP status, 0 gateway failure, -1 none) for outlier detection."""
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

    def _attempt(self, target: tuple[str, int], reuse: bool) -> None:
        """Open an attempt on `target` within the cluster's connection and pending limits."""
        breaker = self.breaker
        if breaker is not None:
            if not breaker.try_acquire(CONNECTIONS):
                self._end_attempt(-1)
                return self.overloaded(b"cluster_connections")
            self.cb_held |= HELD_CONNECTION
            if not breaker.try_acquire(PENDING):
                self._end_attempt(-1)
                return self.overloaded(b"cluster_pending")
            self.cb_held |= HELD_PENDING
        if self.h2:
            return open_h2_attempt(self, target)  # type: ignore[arg-type]
        pool = self.ds.proxy.pool
        if reuse:
            pool.acquire_for(self, target, self.connect_timeout_s)  # type: ignore[arg-type]
        else:
            pool.connect_for(self, target, self.connect_timeout_s)  # type: ignore[arg-type]

    def on_connected(self, conn: UpstreamConnection) -> None:
        if self.cb_held & HELD_PENDING:
            self.cb_held &= ~HELD_PENDING
            self.breaker.release(PENDING)  # type: ignore[union-attr]
        self.conn = conn
        conn.exchange = self  # type: ignore[assignment]
        if self.ds.write_paused:  # the client is not reading (a pipelined request's turn came meanwhile)
            conn.pause_reading()
        self.flush_upstream()
        self.ds.resume_for_buffer()

    def on_connect_failed(self, timed_out: bool) -> None:
        stats = self.ds.proxy.stats
        stats.upstream_connect_failures += 1
        self._end_attempt(GATEWAY_FAILURE)
        if self._may_retry("connect-failure"):
            self._retry(reuse=True)
            return
        self.reply(503, b"upstream connect error\n", (), self._exhausted(flags.UF))
        self.ds.flush()

    # ---- retries ------------------------------------------------------------------------------------

    def _replayable(self) -> bool:
        """Nothing of the body went out yet, or all of it is buffered (within MAX_REPLAY_BODY)."""
        return not self.body_streamed or self.body_copy is not None

    def _may_retry(self, condition: str, status: int = 0) -> bool:
        """Whether the retry policy covers this failure and a retry is still allowed."""
        return self.retries.may_retry(condition, status, self._replayable())

    def _exhausted(self, flag: str) -> str:
        """`flag`, plus URX when retries were configured and all were used."""
        return self.retries.exhausted(flag)

    def _retry(self, reuse: bool = False) -> None:
        """Start the next attempt after a jittered back-off (the failed attempt has been ended)."""
        proxy = self.ds.proxy
        proxy.stats.retries += 1
        self._drop_upstream()
        self._rearm_request()
        delay = self.retries.next_backoff(rng.random())
        if self.deadline:
            self.try_deadline = self.deadline  # no per-try clock runs during the back-off
        if delay < 0.001:
            self._next_attempt(reuse)
        else:
            self.backoff = proxy.loop.call_later(delay, self._next_attempt, reuse)

    def _next_attempt(self, reuse: bool) -> None:
        self.backoff = None
        if self.finished:
            return
        per_try = self.retries.policy.per_try_timeout_s
        if self.deadline and per_try:
            self.try_deadline = min(self.deadline, self.ds.proxy.loop.time() + per_try)
        target = self._next_target()
        if target is None:
            self.reply(503, b"no healthy upstream\n", (), flags.UF)
            self.ds.flush()
            return
        self._attempt(target, reuse)
        if self.finished:
            self.ds.flush()

    def _next_target(self) -> tuple[str, int] | None:
        """Where a retry goes: the cluster's next endpoint (the original destination stays the same)."""
        if self.cluster is not None and self.balancer is not None:
            picked = self._pick()
            if picked is None:
                return None
            self.upstream_addr = picked
            self.upstream_key = None
        return self.upstream_addr

    def _rearm_request(self) -> None:
        """What a new attempt sends: the head and the buffered body again, framed as before; body bytes still
        to come are appended by on_request_body as usual."""
        if self.h2:  # an h2 stream: the HEADERS come from h2_fields, the body goes as it came
            out = list(self.body_copy or ())
            if self.req_chunked and self.req_done:
                out.append(self.h2_request_end())
            self.up_out = out
            return
        out = [self.head]
        for data in self.body_copy or ():
            out.append(chunk(data) if self.req_chunked else data)
        if self.req_chunked and self.req_done:
            out.append(self.request_end())
        self.up_out = out

    def _drop_upstream(self) -> None:
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.exchange = None
            conn.close()

    # ---- failures of the upstream connection ----------------------------------------------------------

    def on_upstream_lost(self, conn: UpstreamConnection) -> None:
        """The upstream connection closed (or broke) before the response completed."""
        if self.finished:
            return
        self.conn = None
        if self.resp_started:
            if self.up_framing == FRAME_CLOSE:  # close-delimited body: this is its end
                if self.ds_framing == FRAME_CHUNKED:
                    self.ds.out.append(LAST_CHUNK)
                self.finish()
            else:
                self.flags = flags.UC
                self.keep_alive = False
                self.finish(abort=True)
            self.ds.flush()
            return
        # A pooled connection the server had already closed: safe to try once more on a fresh one
        # when the request can be replayed; the retry policy's "reset" follows the same rule.
        if conn.reused and self._replayable():
            self._end_attempt(-1)
            self._rearm_request()
            self.ds.proxy.pool.connect_for(
                self,
                self._next_target() or self.upstream_addr,  # type: ignore[arg-type]
                self.connect_timeout_s,
            )
            return
        self._end_attempt(GATEWAY_FAILURE)
        if self._may_retry("reset"):
            self._retry()
            return
        self.reply(503, b"upstream connect error or disconnect/reset before headers\n", (), self._exhausted(flags.UC))
        self.ds.flush()

    def on_timeout(self, now: float) -> None:
        """Called by the proxy's deadline sweep once `try_deadline` has passed."""
        if self.finished:
            return
        proxy = self.ds.proxy
        if self.backoff is not None and now < self.deadline:
            self.try_deadline = self.deadline  # waiting to retry: only the overall deadline counts
            return
        proxy.stats.upstream_timeouts += 1
        if now < self.deadline and not self.resp_started and self._may_retry("timeout"):
            # Per-try timeout with retries left: a fresh attempt on a new connection, same overall deadline.
            self._end_attempt(GATEWAY_FAILURE)
            self._retry()
            return
        self._end_attempt(GATEWAY_FAILURE)
        self.deadline = self.try_deadline = float("inf")
        if self.resp_started:
            self.flags = flags.UT
            self.keep_alive = False
            self.finish(abort=True)
        else:
            self.reply(504, b"upstream request timeout\n", (), self._exhausted(flags.UT))
        self.ds.flush()

    if TYPE_CHECKING:  # provided by Exchange

        def flush_upstream(self) -> None: ...
        def request_end(self) -> bytes: ...
        def h2_request_end(self) -> list[tuple[bytes, bytes]]: ...
        def overloaded(self, which: bytes) -> None: ...
        def reply(self, status: int, body: bytes, headers=(), flag: str = "") -> None: ...
        def finish(self, abort: bool = False) -> None: ...
