"""A finished HTTP/1.1 request leaves no reference cycle behind: the Exchange, its Attempt and its ResponseRelay
(composition: each part refers back to its request) are freed by reference counting, not by the cyclic garbage
collector, whose passes would otherwise grow with the request rate (exchange.FINISHED breaks the cycle)."""

from __future__ import annotations

import gc
import http.client

from planemesh.agent.proxy.attempts import Attempt
from planemesh.agent.proxy.exchange import Exchange
from planemesh.agent.proxy.response import ResponseRelay
from tests.proxy.proxy_harness import Backend, ProxyThread


def test_finished_requests_are_freed_without_the_cyclic_gc() -> None:
    with Backend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        for _ in range(20):  # warm: connections pooled, caches filled
            conn.request("GET", "/warm")
            conn.getresponse().read()
        gc.collect()
        baseline = _request_objects()  # other tests' proxies may still hold theirs: count only what this adds
        gc.disable()
        try:
            for i in range(200):
                conn.request("GET", f"/n/{i}")
                response = conn.getresponse()
                assert response.status == 200
                response.read()
            px.call(lambda: None)  # the proxy's loop has run past the last response
            alive = _request_objects()
            assert alive - baseline <= 3 * 2  # at most the request being parsed (and one in progress)
            gc.collect()
            assert _request_objects() == alive  # none of them was garbage waiting for the cyclic GC
        finally:
            gc.enable()
            conn.close()


def _request_objects() -> int:
    return sum(type(o) in (Exchange, Attempt, ResponseRelay) for o in gc.get_objects())
