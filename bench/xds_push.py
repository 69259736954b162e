"""Config push latency: a single route change -> active, p50/p99.

    python -m bench xds_push [--changes 50] [--lab-changes 20] [--no-lab]

(a) in process, no root: ManagementServer + XdsClient on loopback, the apply callback stamps when the
    snapshot with the new route landed (translation included), SotW and Delta:
    - server push -> applied: `ManagementServer.set_resources` (the in-process API);
    - file change -> applied: an atomic rewrite of the resource file, polled every 200 ms (the default)
      and every 20 ms.
(b) full path in a lab (root): the agent (`running_agent`, --bootstrap) fed by a `planemesh xds-server`
    process; the resource file changes the `/` route's direct response, and a probe thread inside the
    client pod's namespace sends a fresh HTTP request every 2 ms until the proxy answers with the new
    body: file change -> the proxy serves the new route, with --poll-interval 0.2 and 0.02.
Every packet stays on loopback or inside the lab's namespaces. Benchmarks measure, they do not assert.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.xds_scale import Recorder, bootstrap
from planemesh.xds.resources import ROUTE, parse_resource_text, unpack
from planemesh.xds.server import ManagementServer
from planemesh.xds.transport import XdsClient

T = "type.googleapis.com/"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = T + "envoy.extensions.filters.http.router.v3.Router"


def listener_and_cluster() -> list[dict]:
    chain = {"name": "envoy.filters.network.http_connection_manager"}
    hcm = {
        "@type": HCM,
        "stat_prefix": "http",
        "rds": {"route_config_name": "routes", "config_source": {"ads": {}}},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    return [
        {
            "@type": T + "envoy.config.listener.v3.Listener",
            "name": "http",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 80}},
            "filter_chains": [{"filters": [{**chain, "typed_config": hcm}]}],
        },
        {
            "@type": T + "envoy.config.cluster.v3.Cluster",
            "name": "passthrough",
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "2s",
        },
    ]


def route_config(marker: str) -> dict:
    """The single route that changes: `/` answers 200 with `marker`; `/pass/` goes to the real server."""
    return {
        "@type": T + "envoy.config.route.v3.RouteConfiguration",
        "name": "routes",
        "virtual_hosts": [
            {
                "name": "any",
                "domains": ["*"],
                "routes": [
                    {"match": {"prefix": "/pass/"}, "route": {"cluster": "passthrough"}},
                    {"match": {"prefix": "/"},
                     "direct_response": {"status": 200, "body": {"inline_string": marker}}},
                ],
            }
        ],
    }  # fmt: skip


def write(path: Path, docs: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(docs))
    os.replace(tmp, path)  # atomic: the poller never reads half a file


def percentiles(ms: list[float]) -> str:
    if not ms:
        return "no samples"
    s = sorted(ms)
    p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
    return f"p50 {statistics.median(s):6.1f} ms  p99 {p99:6.1f} ms  min {s[0]:6.1f}  max {s[-1]:6.1f}  (n={len(s)})"


def has_marker(marker: str):
    return lambda snap: "routes" in snap.routes and marker in repr(snap.routes["routes"])


# ---- (a) in process ---------------------------------------------------------------------------------


async def in_process(mode: str, changes: int, source: str, poll_s: float) -> list[float]:
    """ms from the change (set_resources call, or file rename) to the client's applied snapshot."""
    with tempfile.TemporaryDirectory(prefix="planemesh-bench-") as tmp:
        resdir = Path(tmp)
        write(resdir / "routes.yaml", [*listener_and_cluster(), route_config("change-0")])
        server = ManagementServer(resdir, poll_interval_s=poll_s)
        address = await server.start("127.0.0.1:0")
        rec = Recorder()
        client = XdsClient(bootstrap(address, mode), rec.apply)
        task = asyncio.create_task(client.run())
        out: list[float] = []
        try:
            await rec.wait_for(has_marker("change-0"), 10)
            for k in range(1, changes + 1):
                marker = f"change-{k}"
                await asyncio.sleep(0.02 + (k % 7) * 0.013)  # spread the changes over the poll phase
                if source == "push":
                    msg = unpack(parse_resource_text(yaml.safe_dump([route_config(marker)]), "bench")[0], ROUTE)
                    changed_at = time.monotonic()
                    server.set_resources(ROUTE, [msg])
                else:
                    changed_at = time.monotonic()
                    write(resdir / "routes.yaml", [*listener_and_cluster(), route_config(marker)])
                applied = await rec.wait_for(has_marker(marker), 10)
                out.append((applied - changed_at) * 1000)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(0)
        return out


# ---- (b) the agent in a lab -------------------------------------------------------------------------


def _probe_until(address: str, port: int, marker: str, timeout_s: float) -> float | None:
    """In the client pod: a fresh connection every 2 ms until `/` answers with `marker`; when it did."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(address, port, timeout=1)
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            if marker.encode() == resp.read():
                return time.monotonic()
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.002)
    return None


def lab(changes: int, poll_s: float) -> tuple[list[float], int]:
    from planemesh.labs import netns as ns_tools
    from planemesh.model.static_config import default_config_text
    from tests.netns.agent_lab import eventually, running_agent

    prefix = os.environ.setdefault("PM_RUN_PREFIX", f"pb{os.getpid() % 10000}")
    with tempfile.TemporaryDirectory(prefix="planemesh-bench-") as tmp:
        work = Path(tmp)
        res, sock, boot = work / "res", work / "xds.sock", work / "bootstrap.yaml"
        res.mkdir()
        write(res / "routes.yaml", [*listener_and_cluster(), route_config("change-0")])
        boot.write_text(yaml.safe_dump({
            "node": {"id": "bench-node"},
            "server": {"address": f"unix://{sock}"},
            "planes": yaml.safe_load(default_config_text())["planes"],
        }))  # fmt: skip
        argv = [sys.executable, "-m", "planemesh.agent.cli", "xds-server", "--resources", str(res),
                "--listen", f"unix://{sock}", "--poll-interval", str(poll_s)]  # fmt: skip
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if not eventually(sock.exists, timeout=15):
                raise RuntimeError("xds-server did not start")
            with running_agent(f"{prefix}p", ["--bootstrap", str(boot)]) as env:
                dst = env.server("oam", 4)
                if ns_tools.call_in(env.client_ns, _probe_until, dst, 80, "change-0", 15) is None:
                    raise RuntimeError("the agent never served the first route")
                out: list[float] = []
                missed = 0
                for k in range(1, changes + 1):
                    time.sleep(0.05 + (k % 7) * 0.023)
                    marker = f"change-{k}"
                    changed_at = time.monotonic()
                    write(res / "routes.yaml", [*listener_and_cluster(), route_config(marker)])
                    seen = ns_tools.call_in(env.client_ns, _probe_until, dst, 80, marker, 5)
                    if seen is None:
                        missed += 1
                    else:
                        out.append((seen - changed_at) * 1000)
                return out, missed
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench xds_push", description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=50, help="route changes per in-process case")
    parser.add_argument("--lab-changes", type=int, default=20, help="route changes per lab case")
    parser.add_argument("--no-lab", action="store_true", help="only the in-process part (no root needed)")
    args = parser.parse_args(argv)
    print("(a) in process: change -> snapshot applied by XdsClient")
    cases: list[tuple[str, str, float]] = [("push", "set_resources", 0.2), ("file", "file, poll 200 ms", 0.2),
                                           ("file", "file, poll 20 ms", 0.02)]  # fmt: skip
    for mode in ("sotw", "delta"):
        for source, label, poll in cases:
            ms = asyncio.run(in_process(mode, args.changes, source, poll))
            print(f"  {mode:5} {label:18} {percentiles(ms)}")
    if args.no_lab:
        return
    if os.geteuid() != 0:
        print("(b) lab: skipped, needs root")
        return
    print("(b) lab: file change -> the agent's proxy serves the new route (HTTP from the client pod)")
    for poll in (0.2, 0.02):
        ms, missed = lab(args.lab_changes, poll)
        print(f"  sotw  xds-server --poll-interval {poll:<4} {percentiles(ms)}  missed {missed}")
