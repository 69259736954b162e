"""Route retry policy, circuit breakers, outlier detection and priority failover through the real proxy.

Several real HTTP servers on loopback play versions of one service; each answers with its own name.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
from dataclasses import replace
from types import MappingProxyType

from planemesh.model.config import (
    CircuitBreakers,
    Cluster,
    HttpFilter,
    OutlierDetection,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfig,
    Snapshot,
    VirtualHost,
)
from tests.proxy.proxy_harness import ProxyThread, ThreadedBackend, free_port, log_line_for
from tests.support.clusters import endpoint
from tests.support.clusters import static_cluster as static
from tests.support.waiting import eventually


class VersionHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: VersionServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        srv = self.server
        with srv.lock:
            srv.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            status = srv.plan.pop(0) if srv.plan else srv.status
        if srv.delay_s:
            time.sleep(srv.delay_s)
        reply = srv.name.encode()
        self.send_response(status)
        self.send_header("content-length", str(len(reply)))
        self.send_header("x-served-by", srv.name)
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = _handle


class VersionServer(ThreadedBackend):
    """A backend named `name`: answers `plan` statuses first, then `status`, after `delay_s`."""

    def __init__(self, name: str, status: int = 200, plan: list[int] | None = None, delay_s: float = 0.0) -> None:
        super().__init__("127.0.0.1", VersionHandler)
        self.name = name
        self.status = status
        self.plan = list(plan or [])
        self.delay_s = delay_s
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()


def with_config(px: ProxyThread, routes: tuple[Route, ...], clusters: dict[str, Cluster],
                http_filters: tuple[HttpFilter, ...] = ()) -> Snapshot:
    """px's snapshot with these routes, clusters and listener filters, applied to its proxy."""
    snap = px.snapshot
    rc = RouteConfig(name="rc", virtual_hosts=(VirtualHost(name="all", domains=("*",), routes=routes),))
    listener = replace(snap.listeners[0], http_filters=http_filters)
    new = replace(snap, version=f"{snap.version}+", listeners=(listener,), routes=MappingProxyType({"rc": rc}),
                  clusters=MappingProxyType(dict(clusters)))
    if px.thread.is_alive():
        px.call(px.proxy.update, new)
    else:
        px.proxy.update(new)
    px.snapshot = new
    return new


def proxy_for(routes: tuple[Route, ...], clusters: dict[str, Cluster],
              http_filters: tuple[HttpFilter, ...] = ()) -> ProxyThread:
    px = ProxyThread([])
    with_config(px, routes, clusters, http_filters)
    return px


def to(cluster: str, **kw) -> tuple[Route, ...]:
    return (Route(action=RouteAction(cluster=cluster, **kw)),)


class Client:
    """One keep-alive client connection to the proxy."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, path: str, method: str = "GET", body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        out = (resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        if resp.will_close:
            self.conn.close()
        return out

    def close(self) -> None:
        self.conn.close()


def get(port: int, path: str, **kw) -> tuple[int, dict[str, str], bytes]:
    client = Client(port)
    try:
        return client.request(path, **kw)
    finally:
        client.close()


# ---- retries -------------------------------------------------------------------------------------------

RETRY_5XX = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=3, backoff_base_s=0.01, backoff_max_s=0.02)


def test_route_retry_turns_flaky_503s_into_200(http) -> None:
    with VersionServer("v1", plan=[503, 503]) as flaky, \
            proxy_for(to("svc", retry=RETRY_5XX), {"svc": static("svc", [endpoint(flaky)])}) as px:
        status, _, body = http.get(px.port, "/flaky")
        assert (status, body) == (200, b"v1")
        assert px.proxy.stats.retries == 2 and len(flaky.seen) == 3


def test_retries_exhausted_pass_the_last_answer_with_urx(http) -> None:
    policy = replace(RETRY_5XX, num_retries=1)
    with VersionServer("v1", status=503) as broken, \
            proxy_for(to("svc", retry=policy), {"svc": static("svc", [endpoint(broken)])}) as px:
        assert http.get(px.port, "/broken")[0] == 503
        assert len(broken.seen) == 2
        assert '" 503 URX ' in log_line_for(px, "/broken")


def test_retriable_status_codes_only_when_listed(http) -> None:
    policy = RetryPolicy(retry_on=frozenset({"retriable-status-codes"}), num_retries=2,
                         retriable_status_codes=frozenset({409}), backoff_base_s=0.001)
    with VersionServer("v1", plan=[409, 503]) as srv, \
            proxy_for(to("svc", retry=policy), {"svc": static("svc", [endpoint(srv)])}) as px:
        assert http.get(px.port, "/codes")[0] == 503  # 409 retried, 503 is not a listed code
        assert len(srv.seen) == 2


def test_route_policy_overrides_plane_sla(http) -> None:
    # No retry on the route: the plane SLA (no retries by default) applies and the 503 passes.
    with VersionServer("v1", plan=[503]) as srv, proxy_for(to("svc"), {"svc": static("svc", [endpoint(srv)])}) as px:
        assert http.get(px.port, "/sla")[0] == 503 and px.proxy.stats.retries == 0


def test_per_try_timeout_moves_to_the_next_endpoint(http) -> None:
    policy = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=1, per_try_timeout_s=0.2, backoff_base_s=0.001)
    with VersionServer("slow", delay_s=1.5) as slow, VersionServer("fast") as fast, \
            proxy_for(to("svc", retry=policy, timeout_s=3.0),
                      {"svc": static("svc", [endpoint(slow), endpoint(fast)])}) as px:
        t0 = time.monotonic()
        status, _, body = http.get(px.port, "/pt")
        elapsed = time.monotonic() - t0
        assert (status, body) == (200, b"fast")
        assert 0.18 < elapsed < 0.9, elapsed  # one per-try timeout, not the slow server's 1.5 s
        assert px.proxy.stats.upstream_timeouts == 1


def test_per_try_timeout_without_retries_left_is_504_ut(http) -> None:
    policy = RetryPolicy(retry_on=frozenset({"5xx"}), num_retries=0, per_try_timeout_s=0.2)
    with VersionServer("slow", delay_s=1.0) as slow, \
            proxy_for(to("svc", retry=policy), {"svc": static("svc", [endpoint(slow)])}) as px:
        t0 = time.monotonic()
        assert http.get(px.port, "/pt504")[0] == 504
        assert time.monotonic() - t0 < 0.8


def test_buffered_body_is_replayed_on_retry(http) -> None:
    body = bytes(range(256)) * 100  # 25.6 KB: within the replay buffer
    with VersionServer("v1", plan=[503]) as srv, \
            proxy_for(to("svc", retry=RETRY_5XX), {"svc": static("svc", [endpoint(srv)])}) as px:
        assert http.get(px.port, "/post", method="POST", body=body)[0] == 200
        assert [entry[3] for entry in srv.seen] == [body, body]


def test_body_beyond_replay_limit_is_not_retried(http) -> None:
    body = b"x" * (200 * 1024)
    with VersionServer("v1", plan=[503]) as srv, \
            proxy_for(to("svc", retry=RETRY_5XX), {"svc": static("svc", [endpoint(srv)])}) as px:
        assert http.get(px.port, "/bigpost", method="POST", body=body)[0] == 503
        assert len(srv.seen) == 1 and px.proxy.stats.retries == 0


def test_connect_failure_retried_by_route_policy(http) -> None:
    policy = RetryPolicy(retry_on=frozenset({"connect-failure"}), num_retries=1, backoff_base_s=0.001)
    with VersionServer("live") as live, \
            proxy_for(to("svc", retry=policy), {"svc": static("svc", [endpoint(free_port()), endpoint(live)])}) as px:
        assert [http.get(px.port, f"/c{i}")[2] for i in range(4)] == [b"live"] * 4


# ---- circuit breakers ---------------------------------------------------------------------------------------

def _hold_one(http, px, slow) -> tuple[threading.Thread, list[int]]:
    """GET /hold in a thread and wait (up to 2 s) until the slow backend has it: (the thread, its status list)."""
    first: list[int] = []
    t = threading.Thread(target=lambda: first.append(http.get(px.port, "/hold")[0]))
    t.start()
    deadline = time.monotonic() + 2
    while not slow.seen and time.monotonic() < deadline:
        time.sleep(0.01)
    return t, first


def test_open_circuit_returns_503_uo_immediately(http) -> None:
    cb = CircuitBreakers(max_requests=1)
    with VersionServer("slow", delay_s=0.6) as slow, \
            proxy_for(to("svc"), {"svc": static("svc", [endpoint(slow)], circuit_breakers=cb)}) as px:
        t, first = _hold_one(http, px, slow)
        t0 = time.monotonic()
        status, headers, _ = http.get(px.port, "/second")
        assert status == 503 and time.monotonic() - t0 < 0.2
        assert headers["x-planemesh-overloaded"] == "cluster_requests"
        assert '" 503 UO ' in log_line_for(px, "/second")
        t.join(5)
        assert first == [200]
        assert http.get(px.port, "/after")[0] == 200  # the unit was released


def test_connection_breaker_queues_as_pending_then_overflows(http) -> None:
    """max_connections bounds the attempts in progress whatever the client speaks (one Attempt for both); as in
    Envoy's HTTP/1.1 pool, a request that finds every connection taken waits for one as a pending request, and
    is refused 503 UO (`cluster_pending`) only when max_pending_requests are taken too. Before: 503 at once."""
    cb = CircuitBreakers(max_connections=1, max_pending_requests=1)
    with VersionServer("slow", delay_s=0.6) as slow, \
            proxy_for(to("svc"), {"svc": static("svc", [endpoint(slow)], circuit_breakers=cb)}) as px:
        t, first = _hold_one(http, px, slow)
        t0 = time.monotonic()
        queued: list = []
        waiter = threading.Thread(target=lambda: queued.append((http.get(px.port, "/queued"), time.monotonic())))
        waiter.start()
        breaker = px.proxy.table.balancer.breaker(px.snapshot.clusters["svc"])
        assert eventually(lambda: len(breaker.waiters) == 1)
        status, headers, _ = http.get(px.port, "/third")  # the one pending unit is the queued request's
        assert status == 503 and headers["x-planemesh-overloaded"] == "cluster_pending"
        assert '" 503 UO ' in log_line_for(px, "/third")
        t.join(5)
        waiter.join(5)
        assert first == [200] and queued[0][0][0] == 200
        assert queued[0][1] - t0 >= 0.3  # it waited for the first request's connection unit
        assert [s[1] for s in slow.seen if s[1].startswith("/queued")] == ["/queued"]
        assert http.get(px.port, "/after")[0] == 200  # the units were given back
        assert breaker.counts == {"requests": 0, "pending": 0, "connections": 0, "retries": 0}


def test_a_queued_request_times_out_and_leaves_the_queue(http) -> None:
    """A request waiting for a connection unit gets the route's timeout (504 UT), leaves the queue and holds no
    unit; the endpoint it never reached is not reported to outlier detection."""
    cb = CircuitBreakers(max_connections=1)
    with VersionServer("slow", delay_s=1.0) as slow, \
            proxy_for(to("svc", timeout_s=0.3), {"svc": static("svc", [endpoint(slow)], circuit_breakers=cb)}) as px:
        breaker = px.proxy.table.balancer.breaker(px.snapshot.clusters["svc"])
        px.call(breaker.try_acquire, "connections")  # every connection unit taken, as by a request in progress
        status, _, _ = http.get(px.port, "/waits")
        assert status == 504 and '" 504 UT ' in log_line_for(px, "/waits")
        assert not breaker.waiters and breaker.counts["pending"] == 0 and slow.seen == []
        px.call(breaker.release, "connections")
        assert http.get(px.port, "/after")[0] == 504  # the slow backend's own timeout: it was sent, not queued
        assert [s[1] for s in slow.seen] == ["/after"]
        assert breaker.counts["connections"] == 0 and breaker.counts["pending"] == 0


def test_retry_budget_of_the_cluster(http) -> None:
    cb = CircuitBreakers(max_retries=0)
    with VersionServer("v1", plan=[503]) as srv, \
            proxy_for(to("svc", retry=RETRY_5XX), {"svc": static("svc", [endpoint(srv)], circuit_breakers=cb)}) as px:
        assert http.get(px.port, "/nobudget")[0] == 503
        assert len(srv.seen) == 1 and '" 503 URX ' in log_line_for(px, "/nobudget")


# ---- outlier detection and failover ---------------------------------------------------------------------------

def test_outlier_ejection_and_return(http) -> None:
    od = OutlierDetection(consecutive_5xx=2, base_ejection_time_s=0.5, max_ejection_percent=50)
    with VersionServer("bad", status=500) as bad, VersionServer("good") as good, \
            proxy_for(to("svc"), {"svc": static("svc", [endpoint(bad), endpoint(good)], outlier=od)}) as px:
        client = http.client(px.port)
        statuses = [client.request(f"/o{i}")[0] for i in range(4)]  # round robin: bad, good, bad, good
        assert statuses == [500, 200, 500, 200]
        served = [client.request(f"/e{i}")[2] for i in range(10)]
        assert served == [b"good"] * 10  # bad is ejected
        time.sleep(0.6)
        back = {client.request(f"/r{i}")[2] for i in range(4)}
        assert b"bad" in back  # returned after the ejection time
        client.close()


def test_priority_failover_to_next_level(http) -> None:
    od = OutlierDetection(consecutive_5xx=1, base_ejection_time_s=30, max_ejection_percent=100)
    with VersionServer("p0", status=503) as p0, VersionServer("p1") as p1, VersionServer("p2") as p2:
        eps = [endpoint(p0, priority=0), endpoint(p1, priority=1), endpoint(p2, priority=2)]
        with proxy_for(to("svc"), {"svc": static("svc", eps, outlier=od)}) as px:
            assert http.get(px.port, "/f0")[0] == 503  # p0 answers and is ejected
            assert {http.get(px.port, f"/f{i}")[2] for i in range(1, 5)} == {b"p1"}
        unhealthy = [endpoint(p0, priority=0, healthy=False), endpoint(p1, priority=1, healthy=False),
                     endpoint(p2, priority=2)]
        with proxy_for(to("svc"), {"svc": static("svc", unhealthy)}) as px:  # EDS health
            assert http.get(px.port, "/h")[2] == b"p2"


def test_connect_failures_eject_a_dead_endpoint(http) -> None:
    od = OutlierDetection(consecutive_5xx=100, consecutive_gateway_failure=1, base_ejection_time_s=30,
                          max_ejection_percent=50)
    with VersionServer("live") as live, \
            proxy_for(to("svc"), {"svc": static("svc", [endpoint(free_port()), endpoint(live)], outlier=od)}) as px:
        assert http.get(px.port, "/d0")[0] == 503  # the dead one, once
        assert [http.get(px.port, f"/d{i}")[2] for i in range(1, 6)] == [b"live"] * 5


def test_snapshot_update_switches_endpoints(http) -> None:
    with VersionServer("a") as a, VersionServer("b") as b, \
            proxy_for(to("svc"), {"svc": static("svc", [endpoint(a)])}) as px:
        assert http.get(px.port, "/u")[2] == b"a"
        with_config(px, to("svc"), {"svc": static("svc", [endpoint(b)])})
        assert http.get(px.port, "/u")[2] == b"b"
