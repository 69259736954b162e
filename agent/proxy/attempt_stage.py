"""A local server pod's stage carried out by a same-node client's Attempt (docs/workloads.md, "Same-node
requests get both stages"): the part of an attempts.Attempt's work that only such requests do, as functions of
the attempt (a StagedAttempt: the Attempt's state they read and write, and the two methods they call).

pipeline.local_inbound decides the server's stage on the endpoint the client's route picked; the attempt then
holds what the server's sidecar would hold (its inbound cluster's request, connection and pending units), waits
its fault delay before the attempt opens, retries by its route's policy on the same endpoint first
(stage_retry.py), reports its local answers to the client's cluster (outlier detection), sends mirrors through
the mirror pod's stage (local_mirrors.py), and runs another local pod's stage when a client retry lands there
(restage.py). A request of any other client never enters these functions: its Attempt calls them only when
`local_client`, `stage` or its inbound units (HELD_INBOUND) are set, and its owner only for a local client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from planemesh.agent.proxy import pipeline
from planemesh.agent.proxy.circuit import CONNECTIONS, PENDING, REQUESTS
from planemesh.agent.proxy.filters import DELAY_INJECTED
from planemesh.agent.proxy.local_mirrors import staged_mirrors
from planemesh.agent.proxy.restage import ANSWERED, GO, SKIP, same_head
from planemesh.agent.proxy.retry import Retries
from planemesh.agent.proxy.stage_retry import StagedRetries

if TYPE_CHECKING:
    import asyncio

    from planemesh.agent.proxy.balancer import Balancer
    from planemesh.agent.proxy.circuit import CircuitBreaker
    from planemesh.agent.proxy.contracts import AttemptOwner, RequestSource
    from planemesh.agent.proxy.pipeline import Delay, Headers, Local
    from planemesh.agent.proxy.routing import CompiledRouteConfig, RouteResult
    from planemesh.model.config import Cluster, Endpoint

HELD_IN_PENDING, HELD_IN_CONNECTION = 8, 16  # a local server's inbound cluster's units (Attempt.inbound_hold)
HELD_INBOUND = HELD_IN_PENDING | HELD_IN_CONNECTION


class StageState:
    """What a local server pod's stage leaves an Attempt to do: its fault delay before the attempt opens, the
    endpoint its own retries go back to, the x-forwarded-client-cert it sets (the codecs add it upstream)."""

    __slots__ = ("delay", "endpoint", "xfcc")

    def __init__(self, xfcc: bytes | None = None) -> None:
        self.delay: Delay | None = None
        self.endpoint: Endpoint | None = None
        self.xfcc = xfcc


class StagedAttempt(Protocol):
    """What the stage's functions use of an attempts.Attempt (its slots; attempts.py imports this module, so the
    Attempt is named here only by this Protocol)."""

    ds: RequestSource
    ex: AttemptOwner
    cluster: Cluster | None
    balancer: Balancer | None
    endpoint: Endpoint | None
    cb_held: int
    inbound_hold: CircuitBreaker | None
    local_client: tuple | None
    local_peer: str | None
    stage: StageState | None
    retries: Any
    upstream_addr: tuple[str, int] | None
    upstream_key: tuple | None
    backoff: asyncio.TimerHandle | None

    def end(self, status: int) -> None: ...

    def open(self, target: tuple[str, int], reuse: bool) -> None: ...


def local_stage(at: StagedAttempt, crc: CompiledRouteConfig, result: RouteResult, authority: str, target: bytes,
                headers: Headers, rbac_denied: Any, peer_ip: str = "") -> Local | RouteResult | None:
    """Step 6 for a local client pod's request on the endpoint just picked (pipeline.local_inbound, one call
    for both codecs), with the client pod's SPIFFE ID from the pod table as its principal: a Local answer
    (reported to the client's cluster as the endpoint's status, as the server's sidecar answering it would
    be), the chained RouteResult, or None. The attempt takes over the rest of the stage: the server's
    inbound cluster's request unit and its connection and pending limits (open), its fault delay (open),
    its route's retry policy (StagedRetries: the same endpoint first). A retry keeps to endpoints of the
    same stage."""
    proxy = at.ds.proxy
    router = proxy.table.router
    assert at.upstream_addr is not None
    principal = router.principal_of(crc, peer_ip) if peer_ip else None  # the client connection's source
    at.local_client = (router, crc, result, authority, target, headers, rbac_denied, principal)
    step = pipeline.local_inbound(proxy, crc, at.upstream_addr, result, authority, target, headers, rbac_denied,
                                  principal)  # fmt: skip
    if step is None:
        return None
    at.local_peer = principal  # what the server's sidecar would log and count as its peer
    if type(step) is pipeline.Local:
        at.end(step.status)
        return step
    stage = at.stage = StageState(router.local_xfcc_at(crc, at.upstream_addr, principal))
    if type(step) is pipeline.Staged:
        stage.delay = step.delay
        at.ex.flags = DELAY_INJECTED
        step = step.result
    at.inbound_hold = step.inbound_hold
    policy = step.inbound_retry
    if policy is not None and policy.num_retries > 0:
        at.retries = StagedRetries(Retries(policy, step.inbound_hold), at.retries)
        stage.endpoint = at.endpoint
    return step


def local_mirrors(at: StagedAttempt, targets: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """A local client's mirror targets (its owner calls this only when `local_client` is set) without the shadows
    a local pod's own stage would answer (local_mirrors.py)."""
    if at.local_client is None or not targets:
        return targets
    return staged_mirrors(at.ds.proxy, at.local_client, targets)


def stage_open(at: StagedAttempt, target: tuple[str, int], reuse: bool) -> bool:
    """A local server stage's part of opening an attempt: its fault delay first (pipeline.Staged: the
    attempt opens when it has passed; False), then its inbound cluster's connection and pending limits
    (refused: False, answered)."""
    stage = at.stage
    delay = stage.delay  # type: ignore[union-attr]
    if delay is not None:
        stage.delay = None  # type: ignore[union-attr]
        at.backoff = at.ds.proxy.loop.call_later(delay.delay_s, _after_stage_delay, at, target, reuse,
                                                 delay.abort_status)  # fmt: skip
        return False
    inbound = at.inbound_hold
    return inbound is None or hold_inbound(at, inbound)


def _after_stage_delay(at: StagedAttempt, target: tuple[str, int], reuse: bool, abort_status: int | None) -> None:
    at.backoff = None
    ex = at.ex
    if ex.finished:
        return
    if abort_status is not None:
        at.end(abort_status)
        ex.reply(abort_status, b"fault filter abort", (), pipeline.fault_abort(abort_status, delayed=True).flag)
    else:
        at.open(target, reuse)
    if ex.finished:
        at.ds.flush()


def hold_inbound(at: StagedAttempt, inbound: CircuitBreaker) -> bool:
    """The local server's inbound cluster's connection and pending limits (its sidecar's pool to its pod),
    held like the client cluster's; refused: 503 UO, which the client's cluster sees from the endpoint."""
    if inbound.try_acquire(CONNECTIONS):
        at.cb_held |= HELD_IN_CONNECTION
        if inbound.try_acquire(PENDING):
            at.cb_held |= HELD_IN_PENDING
            return True
        which = b"cluster_pending"
    else:
        which = b"cluster_connections"
    at.end(503)
    at.ex.overloaded(which)
    return False


def release_inbound(at: StagedAttempt, bits: int) -> None:
    inbound = at.inbound_hold
    held = at.cb_held & bits
    at.cb_held &= ~bits
    if inbound is not None:
        if held & HELD_IN_PENDING:
            inbound.release(PENDING)
        if held & HELD_IN_CONNECTION:
            inbound.release(CONNECTIONS)


def same_endpoint(at: StagedAttempt) -> tuple[str, int] | None:
    """The server stage's retry: the endpoint of its pod again, counted open on the client's cluster as a
    new pick would be (the client's sidecar saw one attempt)."""
    ep = at.stage.endpoint if at.stage is not None else None
    if ep is not None and at.cluster is not None and at.balancer is not None:
        lb = at.balancer.lb(at.cluster)
        if lb.counts:
            lb.started(ep)
        at.endpoint = ep
    at.upstream_key = None
    return at.upstream_addr


def enter_stage(at: StagedAttempt, picked: tuple[str, int]) -> int:
    """A local client's retry to `picked`: when it is another local pod than the last attempt's, that pod's
    stage runs (restage.py): it answers (its RBAC, no route, an abort: ANSWERED, the owner replied), or
    the attempt takes over its holds, fault delay, retry policy and response header changes (GO), unless
    it would change the request head otherwise than the head being resent (SKIP). A remote endpoint or the
    same pod: GO."""
    router, crc, result, authority, target, headers, rbac_denied, principal = at.local_client  # type: ignore[misc]
    stage = router.local_inbound(crc, *picked)
    if stage is None or stage is router.local_inbound(crc, *at.upstream_addr):  # type: ignore[misc]
        return GO
    old = at.inbound_hold  # the last pod's request is over: its inbound request unit is given back first
    if old is not None:
        old.release(REQUESTS)
        at.inbound_hold = None
    step = pipeline.local_inbound(at.ds.proxy, crc, picked, result, authority, target, headers, rbac_denied,
                                  principal)  # fmt: skip
    if step is None:
        return GO
    if type(step) is pipeline.Local:
        at.end(step.status)
        at.ex.reply(step.status, step.body, step.headers, step.flag)
        return ANSWERED
    delay = None
    if type(step) is pipeline.Staged:
        delay, step = step.delay, step.result
    xfcc = router.pods.xfcc(stage, principal)
    if not same_head(step.route, at.ex.route) or xfcc != (at.stage.xfcc if at.stage is not None else None):
        if step.inbound_hold is not None:
            step.inbound_hold.release(REQUESTS)
        if old is not None and old.try_acquire(REQUESTS):  # free again: the head's own stage keeps it
            at.inbound_hold = old
        return SKIP
    at.inbound_hold = step.inbound_hold
    if at.stage is None:
        at.stage = StageState()
    at.stage.delay = delay
    at.ex.route = step.route  # its response header changes
    retries = at.retries
    outer = retries.outer if type(retries) is StagedRetries else retries
    if type(retries) is StagedRetries:
        retries.inner.release()
    policy = step.inbound_retry
    has_retries = policy is not None and policy.num_retries > 0
    at.retries = StagedRetries(Retries(policy, step.inbound_hold), outer) if has_retries else outer  # type: ignore[arg-type]
    return GO
