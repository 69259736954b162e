"""Per-route fault injection (Istio VirtualService `fault`, Envoy typed_per_filter_config): only its route is
delayed or aborted, after routing, through a real proxy worker and a real upstream on loopback; each test body
runs for an HTTP/1.1 and an HTTP/2 client (the `http` fixture)."""

from __future__ import annotations

import time

from planemesh.model.config import FaultFilter, Route, RouteAction, RouteMatch
from tests.proxy.proxy_harness import log_line_for
from tests.proxy.test_traffic_resilience import VersionServer, endpoint, proxy_for, static


def _routes(fault: FaultFilter) -> tuple[Route, ...]:
    faulty = Route(match=RouteMatch(prefix="/ratings"), action=RouteAction(cluster="svc"), fault=fault)
    return (faulty, Route(action=RouteAction(cluster="svc")))


def test_route_fault_aborts_only_its_route(http) -> None:
    with VersionServer("v1") as v1, proxy_for(
        _routes(FaultFilter(abort_status=503, abort_percent=100)), {"svc": static("svc", [endpoint(v1)])}
    ) as px:
        status, _, body = http.get(px.port, "/ratings/1")
        assert (status, body) == (503, b"fault filter abort")
        assert '" 503 FI ' in log_line_for(px, "/ratings/1")
        assert http.get(px.port, "/details/1")[0] == 200
        assert [seen[1] for seen in v1.seen] == ["/details/1"]


def test_route_fault_delays_once_then_forwards(http) -> None:
    with VersionServer("v1") as v1, proxy_for(
        _routes(FaultFilter(delay_s=0.3, delay_percent=100)), {"svc": static("svc", [endpoint(v1)])}
    ) as px:
        t0 = time.monotonic()
        assert http.get(px.port, "/ratings/2")[0] == 200
        assert 0.28 < time.monotonic() - t0 < 1.5  # delayed once, not again when routing resumes
        assert '" 200 DI ' in log_line_for(px, "/ratings/2")
        t0 = time.monotonic()
        assert http.get(px.port, "/details/2")[0] == 200
        assert time.monotonic() - t0 < 0.25
