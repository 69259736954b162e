"""Any downstream codec with any upstream codec, through the one relay (response.py) and the one Attempt: an
HTTP/1.1 and an h2 client, each to an HTTP/1.1 and to an h2 upstream, get the same answers from one test body: a
body echoed byte for byte, and an upstream that drops the request before answering, retried once by the route's
policy and then answered alike for both clients (503 UC,URX for a closed HTTP/1.1 connection, 502 UC,URX for a
reset h2 stream). Before, each of the four pairs had its own code (two of them hand-written adapters)."""

from __future__ import annotations

import http.client

import pytest

from planemesh.model.config import Cluster, ClusterKind, Endpoint, RetryPolicy, Route, RouteAction
from tests.proxy.proxy_harness import Backend, ProxyThread, big_body, log_line_for
from tests.proxy.test_h1_to_h2 import H2Backend
from tests.proxy.test_h2_pool import H2Client

BODY = big_body(16_000)  # one DATA frame of the test's h2 client


def _h1(port: int) -> tuple[tuple[int, bytes], int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/echo/h1", body=BODY)
    r = conn.getresponse()
    echo = (r.status, r.read())
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/reset")
    r = conn.getresponse()
    r.read()
    conn.close()
    return echo, r.status


def _h2(port: int) -> tuple[tuple[int, bytes], int]:
    with H2Client(port) as client:
        got = client.get("/echo/h2", "POST", BODY)
        echo = (got["status"], bytes(got["body"]))
        return echo, client.get("/reset")["status"]


@pytest.mark.parametrize("upstream", ["http1", "h2"])
def test_both_clients_get_the_same_answers_from_either_upstream(upstream: str) -> None:
    with Backend() as h1b, H2Backend() as h2b:
        port = h2b.port if upstream == "h2" else h1b.port
        cluster = Cluster(name="up", kind=ClusterKind.STATIC, http2=upstream == "h2",
                          endpoints=(Endpoint("127.0.0.1", port),))
        route = Route(action=RouteAction(cluster="up", retry=RetryPolicy(retry_on=("5xx",), num_retries=1)))
        with ProxyThread([("127.0.0.1", port)], routes=(route,), clusters={"up": cluster}) as px:
            h1_echo, h1_reset = _h1(px.port)
            h2_echo, h2_reset = _h2(px.port)
            assert h1_echo == h2_echo == (200, BODY)
            want = 502 if upstream == "h2" else 503
            assert h1_reset == h2_reset == want
            for protocol in ("HTTP/1.1", "HTTP/2"):
                assert f'" {want} UC,URX ' in log_line_for(px, f"GET /reset {protocol}")
