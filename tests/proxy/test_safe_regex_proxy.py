"""A catastrophic route regex cannot stall the proxy (issue 11, finding 4): with RE2 the abusive request is
answered and a second client on the same worker is served at once. With a backtracking engine the first
request held the worker (and its GIL) for minutes and the second client timed out."""

from __future__ import annotations

import threading

from planemesh.model.config import HeaderMatch, Route, RouteAction, RouteMatch
from tests.proxy.test_traffic_resilience import Client, VersionServer, endpoint, proxy_for, static

EVIL_A = 30  # `a`s: about a minute for Python's re, doubling with each one


def test_catastrophic_route_regex_does_not_stall_other_clients() -> None:
    routes = (
        Route(match=RouteMatch(prefix=None, regex="/(a+)+$"), action=RouteAction(cluster="evil")),
        Route(match=RouteMatch(prefix="/", headers=(HeaderMatch(name="x-a", regex="(a+)+$"),)),
              action=RouteAction(cluster="evil")),
        Route(action=RouteAction(cluster="good")),
    )
    with VersionServer("evil") as evil, VersionServer("good") as good, \
            proxy_for(routes, {"evil": static("evil", [endpoint(evil)]),
                               "good": static("good", [endpoint(good)])}) as px:
        answers: dict[str, tuple[int, bytes]] = {}

        def abuse(name: str, path: str, headers: dict[str, str]) -> None:
            client = Client(px.port, timeout=10.0)
            try:
                status, _, body = client.request(path, headers=headers)
                answers[name] = (status, body)
            finally:
                client.close()

        attackers = [
            threading.Thread(target=abuse, args=("path", "/" + "a" * EVIL_A + "b", {})),
            threading.Thread(target=abuse, args=("header", "/h", {"x-a": "a" * EVIL_A + "b"})),
        ]
        for t in attackers:
            t.start()
        # The well-behaved client, on the same worker, while (or after) the abusive requests are routed.
        client = Client(px.port, timeout=5.0)
        try:
            status, _, body = client.request("/ok")
        finally:
            client.close()
        assert (status, body) == (200, b"good")
        for t in attackers:
            t.join(timeout=15)
        # Full-match semantics: neither abusive value matches its regex, so both fall through to "good";
        # the same values without the trailing `b` match.
        assert answers == {"path": (200, b"good"), "header": (200, b"good")}
        full = Client(px.port)
        try:
            assert full.request("/" + "a" * EVIL_A)[2] == b"evil"
            assert full.request("/h", headers={"x-a": "a" * EVIL_A})[2] == b"evil"
        finally:
            full.close()
