"""Cost of the traffic features (issue 6): req/s through the agent with retries, the fault filter and a local
rate limit enabled vs plain routing, side by side in one run.

    ./run.sh bench traffic_features [--seconds 5] [--rounds 3] [--connections 16]

One lab, one agent on xDS (its embedded management server serves the resources this script writes). nginx
(one worker) in the server pod on port 8081 is the one endpoint of the EDS cluster `backend`. Two HTTP
listeners on every plane, measured on oam (so one proxy worker serves both):
  plain     port 80:   route / -> backend
  featured  port 8080: local_ratelimit (a bucket of 10^9 tokens refilled every second: every request takes a
                       token, none is ever refused), then a header-controlled fault filter (no x-envoy-fault-*
                       header is sent: evaluated on every request, never fires), then the router; route / ->
                       backend with a retry policy (5xx, gateway-error, connect-failure, reset; 2 retries,
                       per-try timeout 5 s)
After a 1 s warm-up of each, wrk -t1 -cN measures both in every round, in alternating order (ABBA). Reported:
each round, the mean req/s per case, and featured / plain of the means and as the median of the rounds' ratios
(robust to a round disturbed by other load; target >= 0.8).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.common import HEADER, WrkResult, start_nginx, wait_http, wrk
from planemesh.labs import load_lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.envoy_resources import (
    eds_cluster,
    fault,
    http_listener,
    load_assignment,
    local_ratelimit,
    locality,
    route,
    route_config,
    write_resource_file,
)
from planemesh.labs.traffic import host_port

BACKEND_PORT, PLAIN_PORT, FEATURED_PORT = 8081, 80, 8080
RETRY = {"retry_on": "5xx,gateway-error,connect-failure,reset", "num_retries": 2, "per_try_timeout": "5s"}
NEVER_LIMITS = local_ratelimit(10**9, tokens_per_fill=10**9, fill_interval_ms=1000)
FEATURE_FILTERS = [NEVER_LIMITS, fault(header_controlled=True)]


def resources(backend: str) -> list[dict]:
    return [
        http_listener("plain", PLAIN_PORT, routes="plain"),
        http_listener("featured", FEATURED_PORT, filters=FEATURE_FILTERS, routes="featured"),
        route_config([route(cluster="backend")], name="plain"),
        route_config([route(cluster="backend", retry_policy=RETRY)], name="featured"),
        eds_cluster("backend"),
        load_assignment("backend", [locality([(backend, BACKEND_PORT)])]),
    ]


def run(seconds: int, rounds: int, connections: int, prefix: str) -> list[tuple[WrkResult, WrkResult]]:
    from tests.netns.agent_lab import running_agent

    with tempfile.TemporaryDirectory(prefix="planemesh-bench-") as tmp:
        work = Path(tmp)
        (work / "xds").mkdir()
        host = load_lab(prefix=prefix).pod_addr("server", "oam", 4) or ""
        write_resource_file(work / "xds" / "traffic.json", resources(host))
        with running_agent(prefix, ["--xds-resources", str(work / "xds")]) as env:
            nginx = start_nginx(env.lab, "server", [BACKEND_PORT], work)
            try:
                client = env.client_ns
                wait_http(client, host, PLAIN_PORT)
                # Proof the features sit on the featured listener only: a fault header aborts there, not on plain.
                abort = {"x-envoy-fault-abort-request": "418"}
                wait_http(client, host, FEATURED_PORT, status=418, headers=abort)
                wait_http(client, host, PLAIN_PORT, headers=abort)
                cases = {"plain routing": PLAIN_PORT, "retries+fault+ratelimit": FEATURED_PORT}
                urls = {name: f"http://{host_port(host, port)}/" for name, port in cases.items()}
                for name in cases:  # warm-up: connections pooled, caches filled
                    wrk(client, name, urls[name], connections=connections, seconds=1)
                out = []
                for i in range(rounds):
                    order = list(cases) if i % 2 == 0 else list(reversed(cases))  # ABBA: drift cancels out
                    got = {name: wrk(client, name, urls[name], connections=connections, seconds=seconds)
                           for name in order}  # fmt: skip
                    out.append((got["plain routing"], got["retries+fault+ratelimit"]))
                return out
            finally:
                ns_tools.stop(nginx)


def report(pairs: list[tuple[WrkResult, WrkResult]], seconds: int, connections: int) -> str:
    lines = [f"wrk -t1 -c{connections} -d{seconds}s through the agent (oam plane, 1 worker) to nginx", HEADER]
    for plain, featured in pairs:
        lines += [plain.row(), featured.row(plain)]
    plain_rps = statistics.mean(p.rps for p, _ in pairs)
    featured_rps = statistics.mean(f.rps for _, f in pairs)
    errors = sum(p.errors + f.errors for p, f in pairs)
    lines += [
        "",
        f"mean req/s: plain {plain_rps:.0f}, featured {featured_rps:.0f} over {len(pairs)} round(s); errors {errors}",
        f"featured / plain req/s: {featured_rps / plain_rps:.3f} (of the means), "
        f"{statistics.median(f.rps / p.rps for p, f in pairs):.3f} (median of the rounds)   (target >= 0.8)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="plain and featured alternate this many times")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--prefix", default="pmtf")
    args = parser.parse_args(argv)
    print(report(run(args.seconds, args.rounds, args.connections, args.prefix), args.seconds, args.connections))


if __name__ == "__main__":
    main()
