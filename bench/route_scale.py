"""Per-request cost of a route table with 1, 100 and 10,000 routes: the routing step alone, and end to end.

    ./run.sh bench route_scale                    # in-process, no root
    ./run.sh bench route_scale --e2e [--seconds 5] [--connections 4] [--rounds 3]   # through the agent (root)

In-process: PlaneRouter.route_request (memoised and header-matched), the endpoint pick (round robin and ring
hash) and the trace headers, per request, in microseconds; growth against 1 route.
End to end (issue 6 target: p50 grows < 10% from 1 to 10,000 routes): one lab, the agent on xDS (its embedded
management server serves a file this script rewrites), nginx in the server pod as the one endpoint. Routes
`/svc<i>/` (path-only, or each also matching header `x-v: 1`) all lead to nginx (prefix rewritten to `/`); wrk
requests the last route's path (the worst case for a linear first match) with -t1 -cN after a 1 s warm-up;
p50, p99 and req/s per table size, growth of p50 against 1 route. With --rounds, the sizes go up and down in
turn and each case reports its median-p50 round (identical runs differ by +/-15% on a busy 2-core VM).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path
from types import MappingProxyType

from planemesh.agent.proxy.balancer import Balancer
from planemesh.agent.proxy.lb import hash64
from planemesh.agent.proxy.routing import PlaneRouter
from planemesh.agent.proxy.tracing import outgoing_trace_headers
from planemesh.model.config import (
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
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import Plane


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


SIZES = (1, 100, 10_000)


def in_process() -> None:
    headers = {"x-v": "1"}
    for with_headers in (False, True):
        base = None
        for n_routes in SIZES:
            snap = snapshot(n_routes, with_headers)
            router = PlaneRouter(snap, "p")
            crc = router.route_config("127.0.0.1", 80)
            target = f"/svc{n_routes - 1}/x".encode()  # the last route: worst case for a linear match
            reps = 20_000
            us = per_call_us(functools.partial(router.route_request, crc, "h", target, lambda: headers), reps)
            base = base or us
            kind = "header-matched (not memoised)" if with_headers else "path-only (memoised)"
            print(f"routes={n_routes:>6} {kind:<30} {us:8.2f} us/request  {(us / base - 1) * 100:+6.1f}% vs 1 route")
    snap = snapshot(1, False)
    balancer = Balancer(snap)
    rr, ring = snap.clusters["c"], snap.clusters["h"]
    print(f"pick round robin          {per_call_us(lambda: balancer.pick_endpoint(rr), 50_000):8.2f} us")
    key = hash64(b"user")
    print(f"pick ring hash (8 eps)    {per_call_us(lambda: balancer.pick_endpoint(ring, key), 50_000):8.2f} us")
    print(f"trace headers             {per_call_us(lambda: outgoing_trace_headers({}), 50_000):8.2f} us")


# ---- end to end ---------------------------------------------------------------------------------------------

BACKEND_PORT = 8081


def e2e_resources(n_routes: int, with_headers: bool, backend: str, generation: int) -> list[dict]:
    """n routes `/g<generation>-svc<i>/` to nginx: the generation makes the last route's path new to each table,
    so its first 200 shows the table is applied."""
    from planemesh.labs.envoy_resources import (
        eds_cluster,
        header_exact,
        http_listener,
        load_assignment,
        locality,
        route,
        route_config,
    )

    match = [header_exact("x-v", "1")] if with_headers else []
    # nginx serves "/": each route rewrites its prefix to it (the same work at every table size).
    routes = [route(route_path(i, generation), "backend", headers=match, prefix_rewrite="/") for i in range(n_routes)]
    return [http_listener(), route_config(routes), eds_cluster("backend"),
            load_assignment("backend", [locality([(backend, BACKEND_PORT)])])]  # fmt: skip


def route_path(i: int, generation: int) -> str:
    return f"/g{generation}-svc{i}/"


def e2e(seconds: int, connections: int, rounds: int, prefix: str) -> None:
    from bench.common import WrkResult, parse_wrk, start_nginx, wait_http
    from planemesh.labs import load_lab
    from planemesh.labs import netns as ns_tools
    from planemesh.labs.envoy_resources import write_resource_file
    from tests.netns.agent_lab import running_agent

    host = load_lab(prefix=prefix).pod_addr("server", "oam", 4) or ""
    runs: dict[tuple[bool, int], list[WrkResult]] = {}
    applied: dict[tuple[bool, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="planemesh-bench-") as tmp:
        work = Path(tmp)
        (work / "xds").mkdir()
        config = work / "xds" / "routes.json"
        write_resource_file(config, e2e_resources(1, False, host, 0))
        with running_agent(prefix, ["--xds-resources", str(work / "xds")]) as env:
            nginx = start_nginx(env.lab, "server", [BACKEND_PORT], work)
            try:
                generation = 0
                for i in range(rounds):
                    sizes = SIZES if i % 2 == 0 else SIZES[::-1]  # alternate the order: drift cancels out
                    for case in [(h, n) for h in (False, True) for n in sizes]:
                        with_headers, n = case
                        generation += 1
                        started = time.monotonic()
                        write_resource_file(config, e2e_resources(n, with_headers, host, generation))
                        path = route_path(n - 1, generation)  # the last route: worst case for a linear match
                        headers = {"x-v": "1"} if with_headers else None
                        wait_http(env.client_ns, host, 80, headers=headers, path=path, timeout=180)
                        applied.setdefault(case, []).append(time.monotonic() - started)
                        argv = ["wrk", "-t1", f"-c{connections}", "--latency",
                                *(["-H", "x-v: 1"] if with_headers else []), f"http://{host}{path}"]  # fmt: skip
                        ns_tools.run(env.client_ns, [*argv, "-d1s"], timeout=30)  # warm-up
                        out = ns_tools.run(env.client_ns, [*argv, f"-d{seconds}s"], timeout=seconds + 30).stdout
                        runs.setdefault(case, []).append(parse_wrk(str(n), out))
            finally:
                ns_tools.stop(nginx)
    print(f"wrk -t1 -c{connections} -d{seconds}s through the agent to nginx, the last route's path"
          + (f"; median p50 of {rounds} rounds" if rounds > 1 else ""))  # fmt: skip
    print(f"{'routes':>6} {'kind':<16} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  p50 growth")
    for with_headers in (False, True):
        base = None
        for n in SIZES:
            results = sorted(runs[(with_headers, n)], key=lambda r: r.p50_ms)
            r = results[len(results) // 2]
            base = base or r.p50_ms
            kind = "header-matched" if with_headers else "path-only"
            growth = (r.p50_ms / base - 1) * 100
            print(f"{n:>6} {kind:<16} {r.rps:8.0f} {r.p50_ms:8.3f} {r.p99_ms:8.3f} {r.errors:6d}  {growth:+6.1f}%"
                  f"   (table applied in {max(applied[(with_headers, n)]):.1f} s)")  # fmt: skip
    print("target: p50 growth from 1 to 10,000 routes < 10%")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--e2e", action="store_true", help="also through the agent in a lab (needs root)")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the end-to-end sweep; report median p50s")
    parser.add_argument("--prefix", default="pmrs")
    args = parser.parse_args(argv)
    in_process()
    if args.e2e:
        print()
        e2e(args.seconds, args.connections, args.rounds, args.prefix)


if __name__ == "__main__":
    main()
