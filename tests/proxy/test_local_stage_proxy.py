"""The server pod's whole inbound stage for a same-node client, through a real proxy on loopback, HTTP/1.1 and
h2 (docs/workloads.md, "Same-node requests get both stages"): what B's sidecar would do after A's, in one hop.

Client pods are loopback addresses with their own outbound listener (Listener.sources, the SPIFFE ID the
workloads merge gives it in Listener.workload_principal); the server pod b is the backend at 127.0.0.1, whose
inbound chain (prefix 127.0.0.1/32, its port) holds b's routes, filters and inbound cluster. Each test fails on
the code before session 7, which applied only b's headers, 404, direct responses, timeout, filters' aborts and
rate limits, and its inbound request limit."""

from __future__ import annotations

import asyncio
import threading
import time
from types import MappingProxyType

import pytest
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from google.protobuf import json_format

from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.model.config import (
    CircuitBreakers,
    Cluster,
    ClusterKind,
    Endpoint,
    FaultFilter,
    Listener,
    ListenerProtocol,
    Mirror,
    OutlierDetection,
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
from planemesh.xds.resources import pack
from planemesh.xds.translate_rbac import translate_rbac
from tests.proxy.clients import H1Client
from tests.proxy.proxy_harness import PLANE, Backend, ServingProxy, log_line_for
from tests.support.waiting import wait_for

CLIENT = "127.0.0.2"  # pod a, service account `client`
OTHER = "127.0.0.4"  # pod d, service account `other`
SA_CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SA_OTHER = "spiffe://cluster.local/ns/default/sa/other"
SA_SERVER = "spiffe://cluster.local/ns/default/sa/server"  # pod b's
TO_B = "outbound|80||b.default.svc.cluster.local"  # an istiod-named cluster: Istio's metrics count it
INBOUND = Route(action=RouteAction(cluster="inb"))


def _snapshot(proxy_port: int, backend_port: int, *, inbound: Route = INBOUND, filters: tuple = (),
              breakers: CircuitBreakers | None = None, pod_c: tuple[str, int] | None = None,
              outlier: OutlierDetection | None = None, mirror: bool = False, out_retry: RetryPolicy | None = None,
              c_filters: tuple = (), xfcc: str = "sanitize") -> Snapshot:  # fmt: skip
    """a and d: outbound listeners of the proxy port (their sources, their SPIFFE IDs) -> cluster TO_B; b: an
    inbound chain at 127.0.0.1:backend_port with `inbound` to cluster inb (`breakers`) and `filters`. `pod_c`:
    a second endpoint of TO_B, pod c's (an inbound chain of its own, nothing in it), `outlier` on TO_B; with
    `mirror`, c is no endpoint of TO_B but a's route mirrors to it, and c's inbound routes serve /api only.
    `out_retry`: a's route's retry policy; `c_filters`: c's inbound HTTP filters; `xfcc`: b's chain's
    forward_client_cert (with istiod's set_current_client_cert_details: subject, uri, dns)."""
    plane = Plane(name=PLANE, plane_id=1, interfaces=("lo",), cidrs=(IPNetwork("127.0.0.0/8"),),
                  proxy_port=proxy_port, sla=SLA())  # fmt: skip
    server = (Endpoint(address="127.0.0.1", port=backend_port),)
    endpoints = server if pod_c is None or mirror else (*server, Endpoint(address=pod_c[0], port=pod_c[1]))
    mirrors = (Mirror("mirror-c"),) if mirror else ()
    out_route = Route(action=RouteAction(cluster=TO_B, mirrors=mirrors, retry=out_retry))
    out = RouteConfig("out", (VirtualHost("out", routes=(out_route,)),))
    listeners = (
        *(Listener(f"0.0.0.0_out~{pod}.default", PLANE, proxy_port, ListenerProtocol.HTTP, route_config="out",
                   sources=(IPNetwork(f"{addr}/32"),), workload_principal=principal)
          for pod, addr, principal in (("a", CLIENT, SA_CLIENT), ("d", OTHER, SA_OTHER))),
        Listener("virtualInbound/0.0.0.0_in~b.default", PLANE, backend_port, ListenerProtocol.HTTP,
                 route_config="in", http_filters=filters, prefixes=(IPNetwork("127.0.0.1/32"),),
                 forward_client_cert=xfcc, client_cert_details=("subject", "uri", "dns"),
                 workload_principal=SA_SERVER),
    )  # fmt: skip
    routes = {"out": out, "in": RouteConfig("in", (VirtualHost("in", routes=(inbound,)),))}
    if pod_c is not None:
        listeners += (Listener("virtualInbound/0.0.0.0_in~c.default", PLANE, pod_c[1], ListenerProtocol.HTTP,
                               route_config="in-c", http_filters=c_filters,
                               prefixes=(IPNetwork(f"{pod_c[0]}/32"),)),)  # fmt: skip
        only_api = Route(match=RouteMatch(prefix="/api"), action=RouteAction(cluster="inb"))
        routes["in-c"] = RouteConfig("in-c", (VirtualHost("in", routes=(only_api if mirror else INBOUND,)),))
    clusters = {
        TO_B: Cluster(TO_B, kind=ClusterKind.STATIC, endpoints=endpoints, outlier=outlier),
        "inb": Cluster("inb", kind=ClusterKind.STATIC, endpoints=server,
                       circuit_breakers=breakers or CircuitBreakers()),
    }  # fmt: skip
    if pod_c is not None:
        clusters["mirror-c"] = Cluster("mirror-c", kind=ClusterKind.STATIC,
                                       endpoints=(Endpoint(address=pod_c[0], port=pod_c[1]),))  # fmt: skip
    return Snapshot(version="t1", planes=(plane,), listeners=listeners, routes=MappingProxyType(routes),
                    clusters=MappingProxyType(clusters))


class Node(ServingProxy):
    """The node's plane proxy on loopback with its access log kept (log_line_for)."""

    def __init__(self, backend_port: int, pod_c: Backend | None = None, **kw) -> None:
        sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
        c = ("127.0.0.3", pod_c.port) if pod_c is not None else None
        snap = _snapshot(sock.getsockname()[1], backend_port, pod_c=c, **kw)
        self.log_lines: list[str] = []
        super().__init__(PlaneProxy(snap, PLANE, access_log=self.log_lines.append, tick_s=0.05), sock)

    def call(self, fn, *args):  # fn(*args) on the proxy's loop, its result
        return asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop).result(timeout=5)

    def flush_log(self) -> list[str]:
        self.call(self.proxy.log.flush)
        return [line for text in self.log_lines for line in text.splitlines()]


async def _call(fn, *args):
    return fn(*args)


def test_the_servers_prefix_rewrite_reaches_the_server(http) -> None:
    """b's inbound route rewrites /api -> /v1 (its VirtualService's rewrite on its inbound route): the pod gets
    /v1/x, as behind b's sidecar. Before: /api/x."""
    rewrite = Route(match=RouteMatch(prefix="/api"), action=RouteAction(cluster="inb", prefix_rewrite="/v1"))
    with Backend() as backend, Node(backend.port, inbound=rewrite) as px:
        status, _, body = http.get(px.port, "/api/x?q=1", source=CLIENT)
    assert status == 200 and body == b"hello /v1/x?q=1\n", (status, body)
    assert [p for _m, p, _h in backend.seen] == ["/v1/x?q=1"]


def test_the_servers_retry_policy_retries_its_pod(http) -> None:
    """b's inbound route retries 5xx once; a's route has no retries. /fail-once answers 503 the first time:
    b's sidecar would retry its pod and answer 200. Before: the 503 reached the client."""
    retry = Route(action=RouteAction(cluster="inb", retry=RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=1)))
    with Backend() as backend, Node(backend.port, inbound=retry) as px:
        status, _, body = http.get(px.port, f"/fail-once/{http.name}", source=CLIENT)
        assert status == 200 and body == b"second\n", (status, body)
        assert http.get(px.port, "/status/500", source=CLIENT)[0] == 500  # retried once, then given up
        line = log_line_for(px, "/status/500")  # type: ignore[arg-type]
    assert [p for _m, p, _h in backend.seen] == [f"/fail-once/{http.name}"] * 2 + ["/status/500"] * 2
    assert "URX" in line, line


@pytest.mark.parametrize("where", ["route", "listener"])
def test_the_servers_fault_abort_and_delay(http, where: str) -> None:
    """b's fault (its inbound route's own, or its listener's fault filter): an abort answers without reaching
    the pod; a delay holds the request before it goes on (DI in the access log). Before: the route's fault
    was not applied at all, the listener's delay neither."""
    for fault, path in ((FaultFilter(abort_status=418, abort_percent=100.0), "/abort"),
                        (FaultFilter(delay_s=0.6, delay_percent=100.0), "/delayed")):  # fmt: skip
        kw = {"inbound": Route(action=RouteAction(cluster="inb"), fault=fault)} if where == "route" \
            else {"filters": (fault,)}
        with Backend() as backend, Node(backend.port, **kw) as px:
            t0 = time.monotonic()
            status, _, _ = http.get(px.port, path, source=CLIENT)
            took = time.monotonic() - t0
            line = log_line_for(px, path)  # type: ignore[arg-type]
        if fault.abort_status:
            assert status == 418 and backend.seen == [] and "FI" in line, (status, backend.seen, line)
        else:
            assert status == 200 and took >= 0.6 and len(backend.seen) == 1 and "DI" in line, (status, took, line)


@pytest.mark.parametrize(("breakers", "which"), [
    (CircuitBreakers(max_connections=1), "cluster_connections"),
    (CircuitBreakers(max_pending_requests=1), "cluster_pending"),
])  # fmt: skip
def test_the_servers_inbound_connection_and_pending_limits(http, breakers: CircuitBreakers, which: str) -> None:
    """b's inbound cluster allows one connection (or one request waiting for its connection): a request to b
    holds it while it runs (pending: while its connection is made), and another is refused 503 UO
    `x-planemesh-overloaded: cluster_connections` (as b's sidecar's pool overflows); both given back after.
    Before: only b's max_requests applied."""
    with Backend() as backend, Node(backend.port, breakers=breakers) as px:
        inbound = px.proxy.table.balancer.breaker(px.proxy.table.snapshot.clusters["inb"])
        if which == "cluster_pending":  # hold the one pending unit as a request waiting for its connection would
            assert px.call(inbound.try_acquire, "pending")
            status, headers, _ = http.get(px.port, "/x", source=CLIENT)
            px.call(inbound.release, "pending")
        else:
            slow: dict = {}
            thread = threading.Thread(target=lambda: slow.update(r=http.get(px.port, "/slow/1.5", source=CLIENT)))
            thread.start()
            try:
                wait_for(lambda: any(p.startswith("/slow") for _m, p, _h in backend.seen), timeout=10, what="/slow")
                status, headers, _ = http.get(px.port, "/x", source=CLIENT)
            finally:
                thread.join(10)
            assert slow["r"][0] == 200
        assert status == 503 and headers.get("x-planemesh-overloaded") == which, (status, headers)
        assert "UO" in log_line_for(px, "\"GET /x")  # type: ignore[arg-type]
        assert [http.get(px.port, f"/ok/{i}", source=CLIENT)[0] for i in range(4)] == [200] * 4  # given back
        assert inbound.counts["connections"] == 0 and inbound.counts["pending"] == 0


def test_a_local_endpoint_whose_stage_fails_is_ejected() -> None:
    """a's cluster TO_B has b's and c's endpoints and outlier detection (2 consecutive 5xx); b's stage answers
    503 itself (its fault filter aborts every request). b's sidecar would answer a's sidecar 503, and a's
    outlier detection would eject b: after two 503s every request goes to c. Before: the stage's answers were
    not reported to a's cluster, and half the requests kept failing."""
    outlier = OutlierDetection(consecutive_5xx=2, base_ejection_time_s=60.0, max_ejection_percent=50)
    abort = (FaultFilter(abort_status=503, abort_percent=100.0),)
    with Backend() as b, Backend("127.0.0.3") as c, Node(b.port, pod_c=c, filters=abort, outlier=outlier) as px:
        statuses = [H1Client(px.port, source=CLIENT).request(f"/r/{i}")[0] for i in range(10)]
    assert statuses.count(503) == 2 and statuses[-6:] == [200] * 6, statuses
    assert b.seen == [] and len(c.seen) == 8


ISTIO_POLICY = {  # AuthorizationPolicy allow-client (namespace default): ALLOW from principals [sa client]
    "rules": {"action": "ALLOW", "policies": {"ns[default]-policy[allow-client]-rule[0]": {
        "permissions": [{"and_rules": {"rules": [{"any": True}]}}],
        "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [
            {"authenticated": {"principal_name": {"exact": SA_CLIENT}}}]}}]}}],
    }}},
}  # fmt: skip


def test_the_servers_rbac_sees_the_same_node_clients_identity(http) -> None:
    """b's AuthorizationPolicy allows principal sa/client only (istiod's RBAC filter shape): pod a (sa client)
    is allowed and pod d (sa other) refused 403, each by the SPIFFE ID the node's pod table gives its address.
    Before: no principal for a same-node client, so both were refused."""
    rbac = translate_rbac(pack(json_format.ParseDict(ISTIO_POLICY, rbac_pb2.RBAC())), "rbac")
    with Backend() as backend, Node(backend.port, filters=(rbac,)) as px:
        allowed = http.get(px.port, "/allowed", source=CLIENT)
        denied = http.get(px.port, "/denied", source=OTHER)
        spoofed = http.get(px.port, "/spoofed", source=OTHER, headers={"x-forwarded-client-cert": f"URI={SA_CLIENT}"})
    assert allowed[0] == 200, allowed
    assert denied[0] == 403 and denied[2] == b"RBAC: access denied", denied
    assert spoofed[0] == 403  # a header never gives an identity
    assert [p for _m, p, _h in backend.seen] == ["/allowed"]


def test_a_mirror_to_a_local_pod_goes_through_its_stage(http) -> None:
    """a's route mirrors every request to pod c, whose inbound routes serve /api only: the shadow of /api/x
    reaches c (Host `...-shadow`), the shadow of /other is answered 404 by c's stage and never reaches c, as
    c's sidecar would have answered it. Before: c got both shadows."""
    with Backend() as b, Backend("127.0.0.3") as c, Node(b.port, pod_c=c, mirror=True) as px:
        assert http.get(px.port, "/other", source=CLIENT)[0] == 200
        assert http.get(px.port, "/api/x", source=CLIENT)[0] == 200
        wait_for(lambda: len(c.seen) >= 1, timeout=10, what="the /api shadow")
        time.sleep(0.3)  # a shadow of /other, if one were sent, would be there by now too
    assert [p for _m, p, _h in b.seen] == ["/other", "/api/x"]
    assert [p for _m, p, _h in c.seen] == ["/api/x"] and c.seen[0][2]["host"].endswith("-shadow"), c.seen


def test_the_same_node_peer_identity_in_the_access_log_and_istio_metrics(http) -> None:
    """A request of pod a that met pod b's stage: the access log shows a's SPIFFE ID as the peer (what b's
    sidecar logs as its downstream peer) and Istio's metrics count it with source a, destination b (both
    sidecars would report that pair). Before: no peer, `unknown` for both."""
    with Backend() as backend, Node(backend.port) as px:
        assert http.get(px.port, "/who", source=CLIENT)[0] == 200
        line = log_line_for(px, "/who")  # type: ignore[arg-type]
        rows = px.call(px.proxy.istio.report, PLANE)
    assert line.rstrip().endswith(f'"{SA_CLIENT}"'), line
    assert [(r["cluster"], r["source_principal"], r["destination_principal"], r["responses"]) for r in rows] == \
        [(TO_B, SA_CLIENT, SA_SERVER, {"2xx": 1})]
    assert backend.seen[0][1] == "/who"


RETRY_5XX = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=3)
DENY_CLIENT = {"rules": {"action": "DENY", "policies": {"ns[default]-policy[no-client]-rule[0]": {
    "permissions": [{"any": True}],
    "principals": [{"authenticated": {"principal_name": {"exact": SA_CLIENT}}}],
}}}}  # fmt: skip


def test_a_retry_to_another_local_pod_runs_that_pods_stage(http) -> None:
    """a's route retries 5xx; TO_B has b's and c's endpoints, both local pods with the same inbound route.
    /fail-once answers 503 the first time on each pod: b's 503 is retried on c (its stage applies: c answers
    503 too, its own first time), then on b (200). With c's policy denying a's identity, the retry on c is
    answered 403 by c's stage, as c's sidecar would answer a's. Before, a retry passed over c (another
    pod's stage) and went back to b."""
    for c_filters, expect in (((), 200), ((translate_rbac(pack(json_format.ParseDict(DENY_CLIENT, rbac_pb2.RBAC())),
                                                          "rbac"),), 403)):  # fmt: skip
        with Backend() as b, Backend("127.0.0.3") as c, \
                Node(b.port, pod_c=c, out_retry=RETRY_5XX, c_filters=c_filters) as px:
            status, _, body = http.get(px.port, "/fail-once/k", source=CLIENT)
        assert status == expect, (status, body, b.seen, c.seen)
        assert [p for _m, p, _h in b.seen][:1] == ["/fail-once/k"]  # the first attempt: b (round robin)
        if expect == 200:
            assert [p for _m, p, _h in c.seen] == ["/fail-once/k"] and len(b.seen) == 2, (b.seen, c.seen)
        else:
            assert c.seen == [] and len(b.seen) == 1 and body == b"RBAC: access denied", (b.seen, c.seen)


@pytest.mark.parametrize("mode", ["append_forward", "sanitize"])
def test_the_servers_xfcc_names_the_same_node_client(http, mode: str) -> None:
    """b's inbound chain forwards client certificate details as istiod configures it (APPEND_FORWARD, subject,
    uri, dns): the pod gets `By=<b>;Subject="";URI=<a>` for a same-node client a (no Hash: no certificate),
    and never what a sent itself; with SANITIZE, no header at all. Before, b's pod got no identity of a."""
    with Backend() as backend, Node(backend.port, xfcc=mode) as px:
        forged = {"x-forwarded-client-cert": f"URI={SA_OTHER}"}
        assert http.get(px.port, "/xfcc", source=CLIENT, headers=forged)[0] == 200
    got = backend.seen[0][2].get("x-forwarded-client-cert")
    if mode == "sanitize":
        assert got is None, got
    else:
        assert got == f'By={SA_SERVER};Subject="";URI={SA_CLIENT}', got
