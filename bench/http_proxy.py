"""Issue-2 benchmark, one lab, one run: direct vs kernel bypass vs planemesh's proxy vs Envoy.

    ./run.sh bench http_proxy [--seconds 5] [--connections 16]

nginx (one worker) in the server pod, wrk -t1 -cN in the client pod, across the node namespace:
  1. direct: no agent at all
  2. agent running, port 9000 declared TCP: bypassed in the kernel (TC program attached)
  3. agent running, port 80 declared HTTP: through planemesh's proxy (one worker process per plane)
  4. Envoy 1.40 (--concurrency 1) behind the same interception: the agent runs --datapath-only (BPF + routes)
     and Envoy binds the plane's transparent listener port with original_dst, as in Istio/Cilium set-ups.
With --h2, cases 3 and 4 are also measured with h2load (h2c prior knowledge, -c16 -m32) in the same run.
Prints req/s, p50/p99, errors and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench.common import HEADER, WrkResult, h2load, scratch_dir, start_nginx, url, wait_http, wrk
from planemesh.agent.demo import start_agent
from planemesh.labs import Lab, load_lab
from planemesh.labs import netns as ns_tools

ENVOY_CONFIG = """\
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}
static_resources:
  listeners:
{listeners}
  clusters:
  - name: orig
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
"""
# One transparent original_dst listener per plane (its proxy port); stats under http.<plane>.
ENVOY_LISTENER = """\
  - name: {name}
    address: {{socket_address: {{address: "::", port_value: {port}, ipv4_compat: true}}}}
    transparent: true
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          access_log:
          - name: envoy.access_loggers.file
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog,
                           path: {access_log}}}
          route_config:
            virtual_hosts:
            - {{name: any, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: orig}}}}]}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"""


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).with_name("envoy"))
    return found


@contextlib.contextmanager
def envoy_in_node(lab: Lab, workdir: Path, port: int | dict[str, int]):
    """Envoy (--concurrency 1) in the node namespace; `port`: the oam plane's proxy port, or plane -> port for
    one listener per plane (a single shared node proxy, as in Istio/Cilium set-ups)."""
    planes = port if isinstance(port, dict) else {"oam": port}
    log = workdir / "envoy.log"
    listeners = "".join(ENVOY_LISTENER.format(name=name, port=p, access_log=log) for name, p in planes.items())
    conf = workdir / "envoy.yaml"
    conf.write_text(ENVOY_CONFIG.format(admin_port=19901, listeners=listeners.rstrip("\n")))
    argv = [envoy_binary(), "-c", str(conf), "--concurrency", "1", "--base-id", str(os.getpid() % 50000 + 1000),
            "--disable-hot-restart", "-l", "warning"]  # fmt: skip
    proc = ns_tools.popen(lab.node_ns, argv)
    try:
        yield proc
    finally:
        ns_tools.stop(proc)


def wait_http_ok(lab: Lab, target_url_host: str, port: int, timeout: float = 20.0, header: str | None = None) -> None:
    """Until the client pod gets a 200 (carrying `header` when given): bench.common.wait_http."""
    wait_http(lab.pod_ns("client"), target_url_host, port, response_header=header, timeout=timeout)


def run(seconds: int, connections: int, prefix: str, h2: bool = False) -> list[WrkResult]:
    lab = load_lab(prefix=prefix)
    client = lab.pod_ns("client")
    server4 = lab.pod_addr("server", "oam", 4) or ""
    results: list[WrkResult] = []
    proven.clear()
    with scratch_dir() as tmp, lab:
        work = Path(tmp)
        nginx = start_nginx(lab, "server", [80, 9000], work)
        try:
            measure = lambda name, port, v=4: results.append(  # noqa: E731
                wrk(client, name, url(lab, "oam", v, port), connections=connections, seconds=seconds)
            )
            measure_h2 = lambda name, port: results.append(  # noqa: E731
                h2load(client, name, url(lab, "oam", 4, port), connections=connections, seconds=seconds)
            )
            measure("direct (no agent)", 80)
            (work / "a").mkdir()
            agent = start_agent(lab, work / "a")
            try:
                measure("agent, TCP port bypassed (kernel)", 9000)
                wait_http_ok(lab, server4, 80)
                before = planemesh_requests(work / "a")
                measure("planemesh proxy, 1 worker, IPv4", 80)
                measure("planemesh proxy, 1 worker, IPv6", 80, 6)
                proven["planemesh"] = (
                    planemesh_requests(work / "a") - before,
                    results[-1].requests + results[-2].requests,
                )
                if h2:
                    measure_h2("planemesh proxy, h2c, IPv4", 80)
            finally:
                ns_tools.stop(agent)
            (work / "b").mkdir()
            agent = start_agent(lab, work / "b", ["--datapath-only"])
            try:
                with envoy_in_node(lab, work, lab_plane_port(lab)):
                    wait_http_ok(lab, server4, 80, header="x-envoy-upstream-service-time")
                    before = envoy_requests(lab)
                    measure("envoy 1.40, concurrency 1, IPv4", 80)
                    proven["envoy"] = (envoy_requests(lab) - before, results[-1].requests)
                    if h2:
                        measure_h2("envoy 1.40, h2c, IPv4", 80)
            finally:
                ns_tools.stop(agent)
        finally:
            ns_tools.stop(nginx)
    return results


# Requests each proxy itself counted during its runs vs requests wrk completed: proof it was in the path.
proven: dict[str, tuple[int, int]] = {}


def planemesh_requests(workdir: Path) -> int:
    from planemesh.agent.admin_client import AdminClient

    time.sleep(0.6)  # workers report every 0.5 s
    _, planes = AdminClient(f"unix://{workdir / 'admin.sock'}").get_json("/planes")
    return sum(view["counters"]["http_requests"] for view in planes["planes"])


def envoy_requests(lab: Lab) -> int:
    out = ns_tools.run(
        lab.node_ns, ["curl", "-s", "http://127.0.0.1:19901/stats?format=json&filter=downstream_rq_total"]
    )
    stats = json.loads(out.stdout)["stats"]
    return sum(int(s["value"]) for s in stats if s["name"].startswith("http.oam.downstream_rq_total"))


def lab_plane_port(lab: Lab) -> int:
    from planemesh.model.static_config import load_default_config

    return load_default_config().plane("oam").proxy_port


def median_results(rounds: list[list[WrkResult]]) -> list[WrkResult]:
    """Per case, the round with the median req/s (noise on a shared 2-core VM is large)."""
    return [sorted(case, key=lambda r: r.rps)[len(case) // 2] for case in zip(*rounds, strict=True)]


def report(results: list[WrkResult], seconds: int, connections: int) -> str:
    by = {r.name: r for r in results}
    direct = by["direct (no agent)"]
    lines = [f"wrk -t1 -c{connections} -d{seconds}s, nginx 1 worker, across the node namespace", HEADER]
    lines += [r.row(direct) for r in results]
    ours, envoy = by["planemesh proxy, 1 worker, IPv4"], by["envoy 1.40, concurrency 1, IPv4"]
    bypass = by["agent, TCP port bypassed (kernel)"]
    added_ours, added_envoy = ours.p50_ms - direct.p50_ms, envoy.p50_ms - direct.p50_ms
    lines += [
        "",
        f"bypass / direct req/s:          {bypass.rps / direct.rps:.3f}   (target >= 0.95)",
        f"planemesh / envoy req/s:        {ours.rps / envoy.rps:.3f}   (target >= 1.2, issue #12)",
        f"added p50 planemesh / envoy:    {added_ours:.3f} / {added_envoy:.3f} ms = "
        f"{(added_ours / added_envoy) if added_envoy > 0 else float('inf'):.2f}   (target <= 2)",
    ]
    if "planemesh proxy, h2c, IPv4" in by and "envoy 1.40, h2c, IPv4" in by:
        h2_ours, h2_envoy = by["planemesh proxy, h2c, IPv4"], by["envoy 1.40, h2c, IPv4"]
        lines.append(f"h2c planemesh / envoy req/s:    {h2_ours.rps / h2_envoy.rps:.3f}   (target >= 1.0; "
                     "h2load -m32: the p50 column is the mean)")
    for name, (counted, sent) in proven.items():
        lines.append(f"in the path: {name} counted {counted} requests of the {sent} wrk completed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--prefix", default="pmbench")
    parser.add_argument("--h2", action="store_true", help="also h2load (h2c, -m32) through planemesh and Envoy")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything; report each case's median round")
    args = parser.parse_args(argv)
    rounds = [run(args.seconds, args.connections, args.prefix, args.h2) for _ in range(args.rounds)]
    print(report(median_results(rounds), args.seconds, args.connections))
    if args.rounds > 1:
        print(
            f"(median of {args.rounds} rounds by req/s; per round: "
            + "; ".join(" ".join(f"{r.rps:.0f}" for r in rnd) for rnd in rounds)
            + ")"
        )


if __name__ == "__main__":
    main()
