"""The two retry stages of a same-node request (agent/proxy/stage_retry.py) and the head check of a retry to
another local pod (agent/proxy/restage.py), pure."""

from __future__ import annotations

import pytest

from planemesh.agent.proxy.circuit import RETRIES, CircuitBreaker
from planemesh.agent.proxy.restage import same_head
from planemesh.agent.proxy.retry import NO_RETRIES, Retries
from planemesh.agent.proxy.stage_retry import StagedRetries
from planemesh.model.config import CircuitBreakers, HeaderValue, RetryPolicy, Route, RouteAction, RouteMatch

pytestmark = pytest.mark.unit
SERVER = RetryPolicy(retry_on=frozenset({"retriable-status-codes"}), num_retries=2,
                     retriable_status_codes=frozenset({409, 503}))  # fmt: skip
CLIENT = RetryPolicy(retry_on=frozenset({"connect-failure"}), num_retries=1, per_try_timeout_s=0.5)


def test_the_servers_retries_come_first_on_the_same_endpoint() -> None:
    staged = StagedRetries(Retries(SERVER, None), Retries(CLIENT, None))
    assert staged.policy.retriable_status_codes == {409, 503} and staged.policy.per_try_timeout_s == 0.5
    assert staged.policy.num_retries == 3 and staged.tries_left == 3
    assert staged.may_retry("status", 503) and staged.same_endpoint  # the server's sidecar retries its pod
    staged.next_backoff(0.5)
    assert staged.may_retry("status", 503) and staged.same_endpoint
    staged.next_backoff(0.5)
    assert not staged.may_retry("status", 503)  # the server's two used; the client's policy does not cover 503
    assert staged.exhausted("") == "" and staged.tries_left == 1


def test_a_client_retry_gives_the_server_a_fresh_budget() -> None:
    staged = StagedRetries(Retries(SERVER, None), Retries(CLIENT, None))
    assert staged.may_retry("connect-failure") and not staged.same_endpoint  # the client's: another endpoint
    staged.next_backoff(0.5)
    assert staged.inner.tries_left == 2 and staged.outer.tries_left == 0
    for _ in range(2):
        assert staged.may_retry("status", 409) and staged.same_endpoint
        staged.next_backoff(0.5)
    assert not staged.may_retry("status", 409) and staged.exhausted("UF") == "UF,URX"


def test_retry_budgets_of_both_clusters_are_held_and_given_back() -> None:
    inbound = CircuitBreaker(CircuitBreakers(max_retries=1))
    staged = StagedRetries(Retries(SERVER, inbound), NO_RETRIES)
    assert staged.may_retry("status", 503)
    assert not staged.may_retry("status", 503)  # the inbound cluster's retry budget (max_retries 1) is spent
    assert inbound.counts[RETRIES] == 1
    staged.release()
    assert inbound.counts[RETRIES] == 0 and NO_RETRIES.tries_left == 0


def _route(prefix=None, rewrite=None, host=None, add=()) -> Route:
    return Route(match=RouteMatch(prefix=prefix), action=RouteAction(cluster="c", prefix_rewrite=rewrite,
                 host_rewrite=host), request_headers_to_add=add)  # fmt: skip


@pytest.mark.parametrize(("a", "b", "same"), [
    (_route(), _route(), True),
    (_route("/a"), _route("/b"), True),  # matches alone do not change the head
    (_route("/a", "/x"), _route("/a", "/x"), True),
    (_route("/a", "/x"), _route("/a", "/y"), False),
    (_route(host="h1"), _route(host="h2"), False),
    (_route(add=(HeaderValue("x", "1"),)), _route(), False),
    (_route(), None, False),
])  # fmt: skip
def test_same_head(a: Route, b: Route | None, same: bool) -> None:
    assert same_head(a, b) is same
