"""A same-node request, client pod -> server pod: planemesh's one hop with both stages vs Envoy 1.40 as the two
sidecars Istio would run, same run, loopback only.

    ./run.sh bench same_node [--seconds 5] [--connections 16]
    ./run.sh bench same_node --bytecodes [--requests 200] [--top 25]   # what the server's stage costs, exactly

nginx (one worker) is the server pod's application (127.0.0.1). The client's stage: a route adding a request
header to the server's cluster. The server's stage: an RBAC filter (AuthorizationPolicy ALLOW), its inbound
route adding a request and a response header, its inbound cluster. Rows (wrk -t1 -cN, HTTP/1.1):

- planemesh, client stage only: one PlaneProxy (as one worker runs it), the server declaring no inbound chain;
- planemesh, both stages: the same proxy, the server's inbound chain at nginx's address (pipeline.local_inbound,
  its RBAC by the client pod's SPIFFE ID from the pod table);
- Envoy, two sidecars: one Envoy `--concurrency 1` with the client's route to a second one with the server's
  RBAC and route (plaintext between them: Istio would add mTLS, so Envoy's real cost is higher; the server's
  RBAC allows any principal, since there is no certificate to match here).

Each row: req/s, p50/p99, and the CPU per request of the proxy processes (user + system from /proc over the
load; both Envoys together), the figure the other work on a shared machine moves least. `--bytecodes`: Python
bytecodes per request of the proxy's path with the client stage only and with both (bench/h1_path_cost.py's
fake transports and counter on this snapshot), a count the machine's load does not move.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import uvloop

from bench.grpc import cpu_seconds
from bench.h1_path_cost import count_bytecodes, wire_h1
from bench.http_proxy import envoy_binary
from bench.proxy_loopback import start_nginx, wrk
from bench.proxy_serve import serve_until_sigterm
from planemesh.agent.proxy.accesslog import file_sink
from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.agent.rbac import RbacFilter, RbacPolicy, Rule
from planemesh.model.config import (
    Cluster,
    ClusterKind,
    Endpoint,
    HeaderValue,
    Listener,
    ListenerProtocol,
    Route,
    RouteAction,
    RouteConfig,
    Snapshot,
    VirtualHost,
)
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import SLA, Plane
from planemesh.model.tls_config import SanMatch
from tests.proxy.proxy_harness import PLANE
from tests.support.net import free_port
from tests.support.procs import dev_module_argv
from tests.support.waiting import wait_port

CLIENT_SA = "spiffe://cluster.local/ns/default/sa/client"

ENVOY_SIDECAR = """\
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          access_log:
          - name: envoy.access_loggers.file
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog,
                           path: {log}}}
          route_config:
            virtual_hosts:
            - name: any
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: next}}
                request_headers_to_add: [{{header: {{key: x-{name}, value: "1"}}}}]
{response_header}          http_filters:
{rbac}          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: next
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: next
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}
"""
ENVOY_RBAC = """\
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  "ns[default]-policy[allow-client]-rule[0]":
                    permissions: [{any: true}]
                    principals: [{any: true}]
"""
ENVOY_RESPONSE_HEADER = """\
                response_headers_to_add: [{header: {key: x-inbound-route, value: "b"}}]
"""


def snapshot(proxy_port: int, nginx_port: int, both: bool):
    """Pod a (127.0.0.1, the load generator's address) with its outbound listener on the proxy port; pod b
    (nginx at 127.0.0.1:nginx_port) with its inbound chain there when `both`."""
    plane = Plane(name=PLANE, plane_id=1, interfaces=("lo",), cidrs=(IPNetwork("127.0.0.0/8"),),
                  proxy_port=proxy_port, sla=SLA())  # fmt: skip
    app = (Endpoint(address="127.0.0.1", port=nginx_port),)
    out = Route(action=RouteAction(cluster="outbound|80||b"), request_headers_to_add=(HeaderValue("x-a", "1"),))
    inbound = Route(action=RouteAction(cluster="inbound|80||"), request_headers_to_add=(HeaderValue("x-b", "1"),),
                    response_headers_to_add=(HeaderValue("x-inbound-route", "b"),))  # fmt: skip
    rbac = RbacFilter("allow", (RbacPolicy("ns[default]-policy[allow-client]-rule[0]", (Rule("any"),),
                                           (Rule("authenticated", string=SanMatch("uri", exact=CLIENT_SA)),)),))
    listeners = [Listener("0.0.0.0_80~a.default", PLANE, proxy_port, ListenerProtocol.HTTP, route_config="out",
                          sources=(IPNetwork("127.0.0.1/32"),), workload_principal=CLIENT_SA)]  # fmt: skip
    if both:
        listeners.append(Listener("virtualInbound/0.0.0.0_80~b.default", PLANE, nginx_port, ListenerProtocol.HTTP,
                                  route_config="in", http_filters=(rbac,), prefixes=(IPNetwork("127.0.0.1/32"),)))
    routes = {"out": RouteConfig("out", (VirtualHost("out", routes=(out,)),)),
              "in": RouteConfig("in", (VirtualHost("in", routes=(inbound,)),))}  # fmt: skip
    clusters = {n: Cluster(n, kind=ClusterKind.STATIC, endpoints=app) for n in ("outbound|80||b", "inbound|80||")}
    return Snapshot(version="bench", planes=(plane,), listeners=tuple(listeners), routes=MappingProxyType(routes),
                    clusters=MappingProxyType(clusters))  # fmt: skip


def serve(proxy_port: int, nginx_port: int, both: bool, log_path: str) -> None:
    """Child process: one PlaneProxy serving the same-node snapshot until SIGTERM."""
    proxy = PlaneProxy(snapshot(proxy_port, nginx_port, both), PLANE, access_log=file_sink(log_path))
    sock = make_listener_socket(proxy_port, transparent=False, host="127.0.0.1")

    serve_until_sigterm(proxy, sock)


@contextlib.contextmanager
def _running(argv: list[str], port: int) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[1])
    try:
        wait_port(port, 20)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def envoy_pair(work: Path, port: int, nginx_port: int) -> Iterator[list[subprocess.Popen]]:
    """Envoy a (the client's sidecar) on `port` -> Envoy b (the server's) -> nginx."""
    b_port = free_port()
    with contextlib.ExitStack() as stack:
        procs = []
        for name, listen, upstream, rbac, resp in (("b", b_port, nginx_port, ENVOY_RBAC, ENVOY_RESPONSE_HEADER),
                                                   ("a", port, b_port, "", "")):  # fmt: skip
            conf = work / f"envoy-{name}.yaml"
            conf.write_text(ENVOY_SIDECAR.format(admin=free_port(), name=name, port=listen, upstream=upstream,
                                                 log=work / f"envoy-{name}.log", rbac=rbac, response_header=resp))
            argv = [envoy_binary(), "-c", str(conf), "--concurrency", "1", "--disable-hot-restart", "-l", "warning",
                    "--base-id", str((os.getpid() + listen) % 50000 + 2000)]  # fmt: skip
            procs.append(stack.enter_context(_running(argv, listen)))
        yield procs


def measure(procs: list[subprocess.Popen], port: int, seconds: int, connections: int) -> dict[str, float]:
    wrk(port, 1, connections)  # warm-up
    cpu0 = sum(cpu_seconds(p) for p in procs)
    result = wrk(port, seconds, connections)
    cpu = sum(cpu_seconds(p) for p in procs) - cpu0
    result["cpu_us"] = cpu / max(1.0, result["rps"] * seconds) * 1e6
    return result


async def _bytecodes(both: bool, requests: int, top: int) -> float:
    """Bytecodes per request through the same-node snapshot (proxy port 8080, nginx 9999), no sockets."""
    proxy = PlaneProxy(snapshot(8080, 9999, both), PLANE, access_log=file_sink(os.devnull))
    one, _down, up = wire_h1(proxy)
    for _ in range(500):
        one()
    proxy.log.flush()  # the warm-up's lines are formatted before counting
    seen = up.data[-1]
    if both != (b"x-b: 1" in seen) or b"x-a: 1" not in seen:
        raise SystemExit(f"the path did not go through the expected stages: {seen!r}")
    counter = count_bytecodes(proxy, one, requests)
    total = sum(counter.counts.values()) / requests
    print(f"{'both stages' if both else 'client stage only'}: {total:.0f} bytecodes per request")
    for where, n in counter.counts.most_common(top):
        print(f"{n / requests:8.1f}  {where}")
    proxy.draining = True
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--bytecodes", action="store_true", help="count bytecodes per request instead (no sockets)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--top", type=int, default=0)
    ap.add_argument("--serve", nargs=4, metavar=("PROXY_PORT", "NGINX_PORT", "MODE", "LOG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(int(args.serve[0]), int(args.serve[1]), args.serve[2] == "both", args.serve[3])
        return 0
    if args.bytecodes:
        one, two = (uvloop.run(_bytecodes(both, args.requests, args.top)) for both in (False, True))
        print(f"the server's stage: +{two - one:.0f} bytecodes per request ({two / one:.2f}x)")
        return 0
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pm-bench-same-node-") as tmp:
        work = Path(tmp)
        nginx_port = free_port()
        nginx = start_nginx(work, nginx_port)
        try:
            for mode in ("client", "both"):
                port = free_port()
                argv = dev_module_argv("bench.same_node", "--serve", str(port), str(nginx_port), mode,
                                       str(work / f"pm-{mode}.log"))  # fmt: skip
                with _running(argv, port) as proc:
                    rows[f"planemesh, {'client stage only' if mode == 'client' else 'both stages, one hop'}"] = \
                        measure([proc], port, args.seconds, args.connections)
            port = free_port()
            with envoy_pair(work, port, nginx_port) as procs:
                rows["Envoy 1.40, two sidecars"] = measure(procs, port, args.seconds, args.connections)
        finally:
            nginx.send_signal(signal.SIGTERM)
            nginx.wait(10)
    print(f"same-node request, wrk -t1 -c{args.connections} {args.seconds}s, {time.strftime('%Y-%m-%d')} "
          "(measured while other work ran)")
    print(f"{'':<36} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} {'non-2xx':>7}")
    for name, r in rows.items():
        print(f"{name:<36} {r['rps']:>9.0f} {r['p50_ms']:>7.3f} {r['p99_ms']:>7.3f} {r['cpu_us']:>10.1f} "
              f"{r['non2xx']:>7.0f}")
    both, envoy = rows["planemesh, both stages, one hop"], rows["Envoy 1.40, two sidecars"]
    print(f"planemesh one hop / Envoy two sidecars: req/s {both['rps'] / envoy['rps']:.2f}x, "
          f"CPU per request {both['cpu_us'] / envoy['cpu_us']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
