"""The retries of a same-node request through two stages, sans-IO (docs/workloads.md, "Same-node requests").

With sidecars, a request from pod A to a pod B of the same node is retried twice over: B's sidecar retries its
own pod by B's inbound route's retry policy, and only the answer it gives up with reaches A's sidecar, which may
retry by A's route's policy (another endpoint, or B again with a fresh inbound retry budget). One proxy hop does
the same with a StagedRetries in place of the Attempt's Retries: the server stage's retries first, on the same
endpoint (`same_endpoint`: Attempt.next_target keeps it), then the client's.
"""

from __future__ import annotations

import dataclasses

from planemesh.agent.proxy.retry import Retries


class StagedRetries:
    """Retries's interface (policy, tries_left, may_retry, next_backoff, exhausted, release) over the server
    stage's `inner` retries and the client's `outer` ones."""

    __slots__ = ("inner", "outer", "policy", "same_endpoint")

    def __init__(self, inner: Retries, outer: Retries) -> None:
        self.inner = inner
        self.outer = outer
        p, q = outer.policy, inner.policy
        # What the response relay and the attempt read: either policy's retriable codes make a status worth
        # asking may_retry about; the client's per-try timeout and back-off (the attempt's clock is the client's).
        self.policy = dataclasses.replace(
            p, retry_on=p.retry_on | q.retry_on, num_retries=p.num_retries + q.num_retries,
            retriable_status_codes=p.retriable_status_codes | q.retriable_status_codes,
        )  # fmt: skip
        self.same_endpoint = False  # the last retry granted is the server stage's: same pod, same stage

    @property
    def tries_left(self) -> int:
        return self.inner.tries_left + self.outer.tries_left

    def may_retry(self, condition: str, status: int = 0, replayable: bool = True) -> bool:
        """The server's policy first (its sidecar retries before answering), else the client's: a client retry
        is a new request for the server's sidecar, whose retry budget starts again."""
        inner = self.inner
        if inner.may_retry(condition, status, replayable):
            self.same_endpoint = True
            return True
        self.same_endpoint = False
        if self.outer.may_retry(condition, status, replayable):
            inner.tries_left = inner.policy.num_retries
            return True
        return False

    def next_backoff(self, roll: float) -> float:
        return (self.inner if self.same_endpoint else self.outer).next_backoff(roll)

    def exhausted(self, flag: str) -> str:
        """`flag`, plus URX when a policy had retries and every one was used."""
        if self.policy.num_retries > 0 and self.tries_left <= 0:
            return f"{flag},URX" if flag else "URX"
        return flag

    def release(self) -> None:
        self.inner.release()
        self.outer.release()
