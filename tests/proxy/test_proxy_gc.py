"""A finished HTTP/1.1 request leaves no reference cycle behind: the Exchange, its Attempt and its ResponseRelay
(composition: each part refers back to its request) are freed by reference counting, not by the cyclic garbage
collector, whose passes would otherwise grow with the request rate (exchange.FINISHED breaks the cycle)."""

from __future__ import annotations

import gc
import http.client

import pytest

from planemesh.agent.proxy.attempts import Attempt
from planemesh.agent.proxy.exchange import Exchange
from planemesh.agent.proxy.h2_stream import Bridge
from planemesh.agent.proxy.h2_upstream import H2ClientStream
from planemesh.agent.proxy.response import ResponseRelay
from planemesh.agent.proxy.response_h2 import H2ResponseWriter
from planemesh.agent.proxy.upstream_request import UpstreamRequest
from planemesh.model.config import Cluster, ClusterKind, Endpoint, Route, RouteAction
from tests.proxy.proxy_harness import Backend, ProxyThread
from tests.proxy.test_h1_to_h2 import H2Backend
from tests.proxy.test_h2_pool import H2Client


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


def _stream_objects() -> int:
    kinds = (Bridge, Attempt, ResponseRelay, H2ResponseWriter, UpstreamRequest, H2ClientStream)
    return sum(type(o) in kinds for o in gc.get_objects())


@pytest.mark.parametrize("upstream", ["http1", "h2"])
def test_finished_h2_streams_are_freed_without_the_cyclic_gc(upstream: str) -> None:
    """The same for an h2 stream (h2_stream.Bridge and the parts it shares with an Exchange), to an HTTP/1.1 and
    to an h2 upstream (before: each finished stream stayed in reference cycles, and the cyclic GC's passes cost
    more CPU than the request)."""
    with H2Backend() as h2b, Backend() as backend:
        if upstream == "h2":
            cluster = Cluster(name="h2", kind=ClusterKind.STATIC, http2=True,
                              endpoints=(Endpoint("127.0.0.1", h2b.port),))
            px = ProxyThread([("127.0.0.1", h2b.port)], routes=(Route(action=RouteAction(cluster="h2")),),
                             clusters={"h2": cluster})
        else:
            px = ProxyThread([("127.0.0.1", backend.port)])
        with px, H2Client(px.port) as client:
            for _ in range(20):
                assert client.get("/echo")["status"] == 200
            px.call(px.proxy.log.flush)
            gc.collect()
            baseline = _stream_objects()
            gc.disable()
            try:
                for i in range(100):
                    assert client.get(f"/echo/{i}")["status"] == 200
                px.call(px.proxy.log.flush)  # the access log lets go of the finished streams
                alive = _stream_objects()
                assert alive - baseline <= 6
                gc.collect()
                assert _stream_objects() == alive  # none of them was garbage waiting for the cyclic GC
            finally:
                gc.enable()
