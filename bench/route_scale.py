"""Per-request cost of the routing step with 1, 100 and 10,000 routes (pure, in-process).

    .venv/bin/python bench/route_scale.py

Measures PlaneRouter.route_request (memoised and header-matched), the endpoint pick (round robin and ring
hash) and the trace headers, per request, in microseconds.
"""

from __future__ import annotations

import functools
import time
from types import MappingProxyType

from netaddr import IPNetwork

from planemesh.agent.config import (
    Cluster,
    ClusterKind,
    Endpoint,
    HeaderMatch,
    LbPolicy,
    Listener,
    ListenerProtocol,
    Route,
    RouteAction,
    RouteConfig,
    RouteMatch,
    Snapshot,
    VirtualHost,
)
from planemesh.agent.proxy.balancer import Balancer
from planemesh.agent.proxy.lb import hash64
from planemesh.agent.proxy.routing import PlaneRouter
from planemesh.agent.proxy.tracing import outgoing_trace_headers
from planemesh.netplanes.model import Plane


def snapshot(n_routes: int, with_headers: bool) -> Snapshot:
    routes = tuple(
        Route(
            match=RouteMatch(prefix=f"/svc{i}/", headers=(HeaderMatch(name="x-v", exact="1"),) if with_headers else ()),
            action=RouteAction(cluster="c"),
        )
        for i in range(n_routes)
    )
    rc = RouteConfig(name="rc", virtual_hosts=(VirtualHost(name="all", routes=routes),))
    plane = Plane(name="p", plane_id=1, interfaces=("lo",), cidrs=(IPNetwork("127.0.0.0/8"),), proxy_port=15001)
    eps = tuple(Endpoint(f"10.0.0.{i}", 80) for i in range(1, 9))
    clusters = {
        "c": Cluster(name="c", kind=ClusterKind.STATIC, endpoints=eps),
        "h": Cluster(name="h", kind=ClusterKind.STATIC, endpoints=eps, lb_policy=LbPolicy.RING_HASH),
    }
    lsn = Listener(name="l", plane="p", port=80, protocol=ListenerProtocol.HTTP, route_config="rc")
    return Snapshot(
        version="1",
        planes=(plane,),
        listeners=(lsn,),
        routes=MappingProxyType({"rc": rc}),
        clusters=MappingProxyType(clusters),
    )


def per_call_us(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    headers = {"x-v": "1"}
    for n_routes in (1, 100, 10_000):
        for with_headers in (False, True):
            snap = snapshot(n_routes, with_headers)
            router = PlaneRouter(snap, "p")
            crc = router.route_config("127.0.0.1", 80)
            target = f"/svc{n_routes - 1}/x".encode()  # the last route: worst case for a linear match
            reps = 20_000
            us = per_call_us(functools.partial(router.route_request, crc, "h", target, lambda: headers), reps)
            kind = "header-matched (not memoised)" if with_headers else "path-only (memoised)"
            print(f"routes={n_routes:>6} {kind:<30} {us:8.2f} us/request")
    snap = snapshot(1, False)
    balancer = Balancer(snap)
    rr, ring = snap.clusters["c"], snap.clusters["h"]
    print(f"pick round robin          {per_call_us(lambda: balancer.pick_endpoint(rr), 50_000):8.2f} us")
    key = hash64(b"user")
    print(f"pick ring hash (8 eps)    {per_call_us(lambda: balancer.pick_endpoint(ring, key), 50_000):8.2f} us")
    print(f"trace headers             {per_call_us(lambda: outgoing_trace_headers({}), 50_000):8.2f} us")


if __name__ == "__main__":
    main()
