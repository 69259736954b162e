"""A local client's request to a local server pod, through a real proxy on loopback: the client's outbound
listener (scoped to its source address 127.0.0.2) routes to the server's endpoint, and the server's inbound
listener at that endpoint (127.0.0.1:<backend port>) applies its route stage too (pipeline.local_inbound): the
route's request and response headers, 404 for a path its routes do not match, its inbound cluster's request
limit (held while the request runs, given back when it ends)."""

from __future__ import annotations

import http.client
import threading
from types import MappingProxyType

import pytest

from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.model.config import (
    CircuitBreakers,
    Cluster,
    ClusterKind,
    Endpoint,
    HeaderValue,
    Listener,
    ListenerProtocol,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfig,
    RouteMatch,
    Snapshot,
    VirtualHost,
)
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import SLA, Plane
from tests.proxy.proxy_harness import PLANE, Backend, ServingProxy
from tests.support.waiting import wait_for

CLIENT = "127.0.0.2"  # the local client pod's address (its outbound listener's source)


def _snapshot(proxy_port: int, backend_port: int, other: tuple[str, int] | None = None) -> Snapshot:
    """a's outbound listener -> cluster to-b (b at 127.0.0.1:backend_port); b's inbound chain there. `other`:
    a second endpoint of to-b, pod c's, with an inbound chain of its own, and a's route retries 5xx."""
    plane = Plane(name=PLANE, plane_id=1, interfaces=("lo",), cidrs=(IPNetwork("127.0.0.0/8"),),
                  proxy_port=proxy_port, sla=SLA())  # fmt: skip
    server = (Endpoint(address="127.0.0.1", port=backend_port),)
    endpoints = server if other is None else (*server, Endpoint(address=other[0], port=other[1]))
    retry = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=3) if other is not None else None
    out = RouteConfig("out", (VirtualHost("out", routes=(Route(action=RouteAction(cluster="to-b", retry=retry)),)),))
    inbound_route = Route(
        match=RouteMatch(prefix=None, regex="/|/[^_].*"), action=RouteAction(cluster="inb"),
        request_headers_to_add=(HeaderValue("x-inbound", "b"),),
        response_headers_to_add=(HeaderValue("x-inbound-route", "b"),),
    )  # fmt: skip
    inbound = RouteConfig("in", (VirtualHost("in", routes=(inbound_route,)),))
    pod_c = RouteConfig("in-c", (VirtualHost("in", routes=(Route(action=RouteAction(cluster="inb")),)),))
    listeners = (
        Listener("0.0.0.0_out~a.default", PLANE, proxy_port, ListenerProtocol.HTTP, route_config="out",
                 sources=(IPNetwork(f"{CLIENT}/32"),)),
        Listener("virtualInbound/0.0.0.0_in~b.default", PLANE, backend_port, ListenerProtocol.HTTP,
                 route_config="in", prefixes=(IPNetwork("127.0.0.1/32"),)),
    )  # fmt: skip
    if other is not None:
        listeners += (Listener("virtualInbound/0.0.0.0_in~c.default", PLANE, other[1], ListenerProtocol.HTTP,
                               route_config="in-c", prefixes=(IPNetwork(f"{other[0]}/32"),)),)  # fmt: skip
    clusters = {
        "to-b": Cluster("to-b", kind=ClusterKind.STATIC, endpoints=endpoints),
        "inb": Cluster("inb", kind=ClusterKind.STATIC, endpoints=server,
                       circuit_breakers=CircuitBreakers(max_requests=1)),
    }  # fmt: skip
    routes = MappingProxyType({"out": out, "in": inbound, "in-c": pod_c})
    return Snapshot(version="t1", planes=(plane,), listeners=listeners, routes=routes,
                    clusters=MappingProxyType(clusters))


@pytest.fixture
def node():
    with Backend() as backend:
        sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
        proxy = PlaneProxy(_snapshot(sock.getsockname()[1], backend.port), PLANE, tick_s=0.05)
        with ServingProxy(proxy, sock) as px:
            yield px, backend


def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(CLIENT, 0))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_the_servers_inbound_route_headers_and_404(node) -> None:
    px, backend = node
    status, headers, _ = _get(px.port, "/x")
    assert status == 200 and headers.get("x-inbound-route") == "b", headers
    assert backend.seen[-1][1] == "/x" and backend.seen[-1][2].get("x-inbound") == "b", backend.seen[-1]
    seen = len(backend.seen)
    status, _, _ = _get(px.port, "/_unserved")  # the server's inbound routes do not match it
    assert status == 404 and len(backend.seen) == seen


def test_the_servers_inbound_cluster_limit_is_held_per_request(node) -> None:
    """max_requests 1 on the server's inbound cluster: a request running holds it (another is refused 503 UO),
    and each finished request gives it back (many in a row all pass)."""
    px, backend = node
    slow: dict = {}
    thread = threading.Thread(target=lambda: slow.update(r=_get(px.port, "/slow/1.5")))
    thread.start()
    try:
        wait_for(lambda: any(p.startswith("/slow") for _m, p, _h in backend.seen), timeout=10, what="/slow")
        status, headers, _ = _get(px.port, "/x")  # while /slow holds the server's one request unit
        assert status == 503 and headers.get("x-planemesh-overloaded") == "cluster_requests", (status, headers)
    finally:
        thread.join(10)
    assert slow["r"][0] == 200
    assert [_get(px.port, f"/x/{i}")[0] for i in range(10)] == [200] * 10  # each released its unit


def test_a_retry_does_not_cross_into_another_pods_stage() -> None:
    """to-b has two endpoints, b's and c's, each a local pod with its own inbound chain; a's route retries 5xx
    (3 retries). The request went through the first endpoint's server stage; a retry passes over the other
    pod, whose stage would be skipped, and goes to an endpoint of the same stage: every attempt lands on one
    pod, each with that pod's stage (b's header on b, none on c). Before, retries went round to the other pod
    carrying b's changes, past c's own filters and routes."""
    with Backend() as first, Backend("127.0.0.3") as second:
        sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
        snap = _snapshot(sock.getsockname()[1], first.port, ("127.0.0.3", second.port))
        with ServingProxy(PlaneProxy(snap, PLANE, tick_s=0.05), sock) as px:
            for _ in range(2):  # round robin: the first attempt of each request starts on another pod
                assert _get(px.port, "/status/503")[0] == 503
            for i in range(4):  # requests that succeed are served by either pod, each through its own stage
                assert _get(px.port, f"/ok/{i}")[0] == 200
    failed = [len([p for _m, p, _h in backend.seen if p == "/status/503"]) for backend in (first, second)]
    assert sorted(failed) == [0, 8] or failed == [4, 4], failed  # 4 attempts each, never split between pods
    assert all(h.get("x-inbound") == "b" for _m, _p, h in first.seen)  # b's stage only on b
    assert not any("x-inbound" in h for _m, _p, h in second.seen)  # c's stage adds nothing
    assert len(first.seen) >= 2 and len(second.seen) >= 2
