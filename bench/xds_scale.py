"""1,000 EDS clusters x 10 endpoints over ADS, SotW vs Delta: time, memory and bytes on the wire.

    python -m bench xds_scale [--clusters 1000] [--endpoints 10] [--changes 5]

Each mode runs in its own child process (peak RSS is per process): an in-process ManagementServer on
loopback and our XdsClient, whose apply callback stamps when a snapshot landed. Reported per mode:
- initial load: server's first response written -> snapshot applied (translation included), the
  responses/resources/bytes the server wrote, peak RSS (client + server share the process);
- one endpoint changed (`--changes` times): server push -> applied, and what the server resent.
No packet leaves loopback. Benchmarks measure, they do not assert.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import time
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from planemesh.model.static_config import load_default_config
from planemesh.xds.bootstrap import Bootstrap
from planemesh.xds.client_state import Mode
from planemesh.xds.resources import CLUSTER, ENDPOINT
from planemesh.xds.server import ManagementServer
from planemesh.xds.transport import XdsClient
from tests.support.procs import dev_module_argv


def eds_cluster(name: str) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    c.connect_timeout.FromMilliseconds(1000)
    return c


def load_assignment(name: str, ci: int, endpoints: int, bump: int = 0) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints in the lab's OAM plane (198.18.1.0/24): addresses only, nothing connects to them."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    lle = cla.endpoints.add()
    for ei in range(endpoints):
        sock = address_pb2.SocketAddress(address=f"198.18.1.{1 + ei % 250}", port_value=10000 + ci * 16 + ei + bump)
        lle.lb_endpoints.add().endpoint.address.socket_address.CopyFrom(sock)
    return cla


def bootstrap(address: str, mode: str) -> Bootstrap:
    return Bootstrap(
        node_id="bench",
        cluster="bench",
        server=address,
        planes=load_default_config().planes,
        mode=Mode(mode),
        initial_fetch_timeout_s=30.0,
        backoff_base_s=0.05,
        backoff_max_s=0.2,
    )


class Recorder:
    """The client's apply callback: remembers when each snapshot landed, wakes waiters."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.snapshots: list[Any] = []
        self.changed = asyncio.Event()

    async def apply(self, snapshot: Any) -> None:
        self.times.append(time.monotonic())
        self.snapshots.append(snapshot)
        self.changed.set()

    async def wait_for(self, predicate, timeout: float = 60.0) -> float:
        """Until the latest snapshot satisfies predicate; returns when it was applied."""
        deadline = time.monotonic() + timeout
        while not (self.snapshots and predicate(self.snapshots[-1])):
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("snapshot not applied in time")
            await asyncio.wait_for(self.changed.wait(), left)
        return self.times[-1]


def wire(server: ManagementServer) -> dict[str, tuple[int, int, int]]:
    """Per short type: (responses, resources, bytes) the server wrote so far, over all streams."""
    out: dict[str, tuple[int, int, int]] = {}
    for status in server.clients():
        for kind, rep in status.types.items():
            r, n, b = out.get(kind, (0, 0, 0))
            out[kind] = (r + rep.responses, n + rep.resources_sent, b + rep.bytes_sent)
    return out


def minus(after: dict, before: dict) -> dict[str, list[int]]:
    return {k: [a - b for a, b in zip(v, before.get(k, (0, 0, 0)), strict=True)] for k, v in after.items()}


async def run_mode(mode: str, clusters: int, endpoints: int, changes: int) -> dict[str, Any]:
    rss_base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    names = [f"svc-{i:04d}" for i in range(clusters)]
    server = ManagementServer(None)
    t0 = time.monotonic()
    server.set_resources(CLUSTER, [eds_cluster(n) for n in names])
    server.set_resources(ENDPOINT, [load_assignment(n, i, endpoints) for i, n in enumerate(names)])
    build_s = time.monotonic() - t0
    address = await server.start("127.0.0.1:0")
    rec = Recorder()
    client = XdsClient(bootstrap(address, mode), rec.apply)
    task = asyncio.create_task(client.run())
    try:
        started = time.monotonic()
        applied_at = await rec.wait_for(lambda s: len(s.clusters) == clusters)
        first_send = server.clients()[0].first_send_at or started
        initial = {
            "connect_to_applied_ms": (applied_at - started) * 1000,
            "first_send_to_applied_ms": (applied_at - first_send) * 1000,
            "wire": minus(wire(server), {}),
            "endpoints": sum(len(c.endpoints) for c in rec.snapshots[-1].clusters.values()),
        }
        await asyncio.sleep(0.3)  # let the ACKs land before counting the next push
        rss_initial_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        change_ms: list[float] = []
        change_wire: dict = {}
        cla = [load_assignment(n, i, endpoints) for i, n in enumerate(names)]
        for k in range(1, changes + 1):
            ci = (k * 37) % clusters
            target = names[ci]
            before = wire(server)
            cla[ci] = load_assignment(target, ci, endpoints, bump=k)  # exactly one CLA differs
            pushed = time.monotonic()
            server.set_resources(ENDPOINT, cla)
            port = 10000 + ci * 16 + k
            at = await rec.wait_for(lambda s, t=target, p=port: s.clusters[t].endpoints[0].port == p)
            change_ms.append((at - pushed) * 1000)
            await asyncio.sleep(0.1)
            change_wire = minus(wire(server), before)
        status = client.status()["types"]
        return {
            "mode": mode,
            "clusters": clusters,
            "endpoints_per_cluster": endpoints,
            "build_resources_ms": build_s * 1000,
            "initial": initial,
            "change_ms": change_ms,
            "change_wire_last": change_wire,
            "nacks": sum(t["nacks"] for t in status.values()),
            "rss_base_mb": rss_base_kb / 1024,
            "rss_peak_after_initial_mb": rss_initial_kb / 1024,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop(0)


def child(argv: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        dev_module_argv("bench", "xds_scale", *argv, "--one"), capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        raise SystemExit(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(r: dict[str, Any]) -> None:
    ini = r["initial"]
    shape = f"{r['clusters']} clusters x {r['endpoints_per_cluster']} endpoints"
    print(f"== {r['mode']}: {shape} ({ini['endpoints']} endpoints applied)")
    print(f"  initial: first response -> applied {ini['first_send_to_applied_ms']:.0f} ms "
          f"(connect -> applied {ini['connect_to_applied_ms']:.0f} ms)")  # fmt: skip
    for kind, (resp, res, size) in sorted(ini["wire"].items()):
        print(f"    {kind}: {resp} responses, {res} resources, {size / 1024:.0f} KiB")
    print(f"  peak RSS {r['rss_peak_after_initial_mb']:.0f} MB after the initial load "
          f"(process base {r['rss_base_mb']:.0f} MB; client + server in one process)")  # fmt: skip
    ms = sorted(r["change_ms"])
    if ms:
        print(f"  one endpoint changed: push -> applied median {ms[len(ms) // 2]:.0f} ms, max {ms[-1]:.0f} ms "
              f"over {len(ms)} changes")  # fmt: skip
        for kind, (resp, res, size) in sorted(r["change_wire_last"].items()):
            if resp:
                print(f"    {kind} per change: {resp} response(s), {res} resource(s), {size} bytes")
    print(f"  NACKs: {r['nacks']}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench xds_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--mode", choices=["sotw", "delta"], action="append")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    modes = args.mode or ["sotw", "delta"]
    if args.one:
        print(json.dumps(asyncio.run(run_mode(modes[0], args.clusters, args.endpoints, args.changes))))
        return
    common = ["--clusters", str(args.clusters), "--endpoints", str(args.endpoints), "--changes", str(args.changes)]
    for mode in modes:
        report(child([*common, "--mode", mode]))
