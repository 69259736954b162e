"""Issue-15 scale figures: 10,000 endpoints in 1,000 clusters and 10,000 routes through the real xDS path.

    ./run.sh bench scale [--changes 5] [--clusters 1000] [--endpoints 10] [--routes 10000] [--vhosts 1000]
    ./run.sh bench scale --in-process        # no root: translate -> worker channel -> route table, per step

Lab run (root): one lab (the default one, two planes, one worker each), a management server in this process on
a unix socket (tests/netns/test_traffic_xds.py XdsPusher), the agent started with --bootstrap on it (ADS, SotW).
Three agent runs, each started on a minimal set (1 cluster, 1 endpoint, 1 route), then pushed:
  clusters   -- N clusters x 1 endpoint, 1 route
  endpoints  -- N clusters x M endpoints, 1 route
  full       -- N clusters x M endpoints and R routes in V virtual hosts (bench/scale_resources.py), then
                `--changes` one-endpoint changes (EDS) and `--changes` one-route changes (RDS).
Apply time = set_resources on the server -> the agent ACKed every changed type; the agent ACKs only once the
snapshot is applied in the agent and acknowledged by every worker (agent/worker_supervisor.py), so it is end to end.
Memory of the agent and of each worker after each push (1 s settle): RSS, PSS and USS (private) from
/proc/PID/smaps_rollup. "What grows with what" is the difference between runs (each against its own minimal
start): per 1,000 clusters (with one endpoint each), per 1,000 endpoints, per 1,000 routes.
With Envoy 1.40 installed (.venv/bin/envoy, --no-envoy to skip): Envoy --concurrency 1 on the same server
and the same full set, its RSS and apply time (its ACK), for comparison. No packet leaves loopback and the
lab's namespaces: endpoints are addresses only, nothing connects to them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.footprint import memory_kb
from bench.scale_resources import Shape, all_docs, endpoint_docs, route_config_doc
from planemesh.labs import procs

MINIMAL = Shape(clusters=1, endpoints=1, routes=1, vhosts=1)
SERVER_S: list[float] = []  # per push: set_resources time in this process (part of push -> ACK)


@dataclass
class Run:
    name: str
    shape: Shape
    apply_s: float = 0.0
    base: dict[str, dict[str, int]] = field(default_factory=dict)  # process -> rss/pss/uss kB, minimal set
    loaded: dict[str, dict[str, int]] = field(default_factory=dict)  # after the push
    endpoint_change_s: list[float] = field(default_factory=list)
    route_change_s: list[float] = field(default_factory=list)
    endpoint_server_s: list[float] = field(default_factory=list)
    route_server_s: list[float] = field(default_factory=list)


def typed(shape: Shape) -> dict[str, list]:
    from planemesh.labs.envoy_resources import by_type

    return by_type(all_docs(shape))


def push(xds: Any, resources: dict[str, list], timeout: float = 120.0) -> float:
    """Replace the server's resources (only types that differ are sent) and wait for the agent's ACK of each."""
    from planemesh.xds.resources import SHORT_NAME, TYPE_ORDER

    nacks = xds._in_loop(xds._nacks)
    started = time.monotonic()
    changed = [t for t in TYPE_ORDER if t in SHORT_NAME and t in resources
               and xds._in_loop(xds.server.set_resources, t, resources[t])]  # fmt: skip
    SERVER_S.append(time.monotonic() - started)  # the management server's share (serialize, digest, send)
    while not xds._in_loop(xds._acked, changed, nacks):
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"no ACK of {[SHORT_NAME[t] for t in changed]} within {timeout} s")
        time.sleep(0.002)
    return time.monotonic() - started


def processes(agent_pid: int) -> dict[str, int]:
    """agent, its zygote (workers forked, the default) and its workers (by pid: worker1, worker2...)."""
    found = {"agent": agent_pid, **{f"zygote{i + 1}": pid for i, pid in enumerate(procs.zygotes(agent_pid))}}
    return {**found, **{f"worker{i + 1}": pid for i, pid in enumerate(procs.worker_pids(agent_pid))}}


def sample(agent_pid: int, settle: float = 1.0) -> dict[str, dict[str, int]]:
    time.sleep(settle)
    return {name: {**memory_kb(pid), **threads_and_grpcio(pid)} for name, pid in processes(agent_pid).items()}


def threads_and_grpcio(pid: int) -> dict[str, int]:
    """The process's thread count, and 1 when grpcio's extension module is mapped (an agent on a bootstrap
    talks xDS with planemesh's own gRPC client since session 8: 0 there, as in the workers)."""
    threads = grpcio = 0
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status") as f:
            threads = next((int(line.split()[1]) for line in f if line.startswith("Threads:")), 0)
        with open(f"/proc/{pid}/maps") as f:
            grpcio = int(any("cygrpc" in line for line in f))
    return {"threads": threads, "grpcio": grpcio}


def one_change(shape: Shape, kind: str, k: int) -> dict[str, list]:
    """The resources of `kind` after changing one endpoint (cluster k*37) or one route (route k*997)."""
    from planemesh.labs.envoy_resources import by_type
    from planemesh.xds.resources import ENDPOINT, ROUTE

    if kind == "endpoint":
        shape.endpoint_bump[(k * 37) % shape.clusters] = k
        docs = [d for i in range(shape.clusters) for d in endpoint_docs(shape, i)]
        return {ENDPOINT: by_type(docs)[ENDPOINT]}
    shape.route_bump[(k * 997) % shape.routes] = k
    return {ROUTE: by_type([route_config_doc(shape)])[ROUTE]}


@contextlib.contextmanager
def agent_on(lab: Any, work: Path, xds: Any, pin_dir: str) -> Iterator[int]:
    from planemesh.agent.demo import start_agent
    from planemesh.labs import netns as ns_tools

    boot = xds.write_bootstrap(work / "bootstrap.yaml", {"id": "scale", "cluster": "bench"})
    agent = start_agent(lab, work, ["--bootstrap", str(boot), "--pin-dir", pin_dir])
    try:
        yield agent.pid
    finally:
        ns_tools.stop(agent)


def lab_runs(shape: Shape, changes: int, envoy: bool) -> tuple[list[Run], dict[str, Any] | None]:
    from planemesh.labs import load_lab
    from tests.netns.test_traffic_xds import XdsPusher
    from tests.xds.xds_harness import LoopThread

    prefix = f"pmsc{secrets.token_hex(2)}"
    pin_dir = f"/sys/fs/bpf/{prefix}"
    runs = [
        Run("clusters", Shape(clusters=shape.clusters, endpoints=1, routes=1, vhosts=1)),
        Run("endpoints", Shape(clusters=shape.clusters, endpoints=shape.endpoints, routes=1, vhosts=1)),
        Run("full", shape),
    ]
    minimal = typed(MINIMAL)
    loop = LoopThread()
    envoy_result = None
    try:
        with tempfile.TemporaryDirectory(prefix="planemesh-bench-") as tmp, load_lab(prefix=prefix) as lab:
            work = Path(tmp)
            xds = XdsPusher(loop, work / "xds.sock")
            for run in runs:
                wanted = typed(run.shape)
                push_quietly(xds, minimal)
                with agent_on(lab, work, xds, pin_dir) as pid:
                    push(xds, minimal)
                    run.base = sample(pid)
                    run.apply_s = push(xds, wanted)
                    run.loaded = sample(pid)
                    if run.name == "full":
                        for k in range(1, changes + 1):
                            run.endpoint_change_s.append(push(xds, one_change(run.shape, "endpoint", k)))
                            run.endpoint_server_s.append(SERVER_S[-1])
                        for k in range(1, changes + 1):
                            run.route_change_s.append(push(xds, one_change(run.shape, "route", k)))
                            run.route_server_s.append(SERVER_S[-1])
            if envoy:
                envoy_result = envoy_run(lab, work, xds, typed(shape), minimal)
            loop.run(xds.server.stop(0))
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)
        loop.close()
    return runs, envoy_result


def push_quietly(xds: Any, resources: dict[str, list]) -> None:
    """Set the server's resources with no client waiting (the next agent starts on them)."""
    from planemesh.xds.resources import TYPE_ORDER

    for t in TYPE_ORDER:
        if t in resources:
            xds._in_loop(xds.server.set_resources, t, resources[t])


def envoy_run(lab: Any, work: Path, xds: Any, full: dict[str, list], minimal: dict[str, list]) -> dict[str, Any] | None:
    """Envoy 1.40 --concurrency 1 on the same management server: RSS on the minimal set, then the full one."""
    from bench.footprint import envoy_ads_in_node

    push_quietly(xds, minimal)
    with envoy_ads_in_node(lab, work, xds.address) as proc:
        if proc is None:
            return None
        push(xds, minimal, timeout=60)
        base = sample(proc.pid)["agent"]
        apply_s = push(xds, full)
        loaded = sample(proc.pid)["agent"]
    return {"apply_s": apply_s, "base": base, "loaded": loaded}


def mb(kb: float) -> str:
    return f"{kb / 1024:6.1f}"


def report(runs: list[Run], envoy: dict[str, Any] | None) -> list[str]:
    out = []
    for run in runs:
        s = run.shape
        out.append(f"== {run.name}: {s.clusters} clusters x {s.endpoints} endpoints, {s.routes} routes in "
                   f"{min(s.vhosts, s.routes)} virtual hosts: applied in {run.apply_s:.2f} s (push->ACK)")  # fmt: skip
        out.append(f"   {'process':8} {'RSS MB':>14} {'PSS MB':>14} {'USS MB':>14}   (minimal -> loaded)  loaded")
        for name in run.loaded:
            b, a = run.base.get(name, {}), run.loaded[name]
            cols = " ".join(f"{mb(b.get(k, 0))}->{mb(a[k]).strip():<6}" for k in ("rss", "pss", "uss"))
            out.append(f"   {name:8} {cols}  threads {a.get('threads', 0)}{', grpcio' if a.get('grpcio') else ''}")
        for label, times, server in (("one endpoint", run.endpoint_change_s, run.endpoint_server_s),
                                     ("one route", run.route_change_s, run.route_server_s)):  # fmt: skip
            if times:
                ms = sorted(t * 1000 for t in times)
                out.append(f"   {label} changed: push -> ACK median {statistics.median(ms):.0f} ms, "
                           f"max {ms[-1]:.0f} ms ({len(ms)} changes; of which the server's set_resources "
                           f"median {statistics.median(server) * 1000:.0f} ms)")  # fmt: skip
    grow = growth(runs)
    out.append("what grows with what (RSS growth of the loaded set over its own minimal start, MB):")
    for what, per in grow.items():
        out.append(f"   {what:28} " + "  ".join(f"{p} {v:+.1f}" for p, v in per.items()))
    if envoy is not None:
        out.append(f"envoy 1.40 --concurrency 1, same server, full set: applied in {envoy['apply_s']:.2f} s, "
                   f"RSS {mb(envoy['base']['rss']).strip()} -> {mb(envoy['loaded']['rss']).strip()} MB")  # fmt: skip
        full = next(r for r in runs if r.name == "full")
        ours = sum(v["rss"] for v in full.loaded.values())
        ours_pss = sum(v["pss"] for v in full.loaded.values())
        out.append(f"   planemesh agent + workers, full set: RSS {mb(ours).strip()} MB (PSS {mb(ours_pss).strip()} MB)"
                   f" = {ours / envoy['loaded']['rss']:.2f}x Envoy's RSS")  # fmt: skip
    return out


def growth(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Per process, MB per 1,000 of each thing, from the differences between runs."""
    by = {r.name: r for r in runs}

    def delta(run: Run, proc: str) -> float:
        return (run.loaded.get(proc, {}).get("rss", 0) - run.base.get(proc, {}).get("rss", 0)) / 1024

    procs = list(by["full"].loaded)
    c, e, f = by["clusters"], by["endpoints"], by["full"]
    n_clusters = c.shape.clusters / 1000
    n_extra_eps = (e.shape.clusters * (e.shape.endpoints - 1)) / 1000
    n_routes = (f.shape.routes - 1) / 1000
    out: dict[str, dict[str, float]] = {}
    out["per 1,000 clusters (1 ep)"] = {p: delta(c, p) / n_clusters for p in procs}
    if n_extra_eps:
        out["per 1,000 endpoints"] = {p: (delta(e, p) - delta(c, p)) / n_extra_eps for p in procs}
    if n_routes:
        out["per 1,000 routes"] = {p: (delta(f, p) - delta(e, p)) / n_routes for p in procs}
    return out


def in_process(shape: Shape, changes: int) -> None:
    """translate (with the client's cache) -> the worker channel's encoder/decoder -> the worker's route table,
    per step, with the compile counters: what an update costs without the network and the processes."""
    from types import MappingProxyType

    from planemesh.agent.proxy.routing_table import RoutingTable
    from planemesh.agent.worker_channel import SnapshotDecoder, SnapshotEncoder
    from planemesh.model.static_config import load_default_config
    from planemesh.xds.client_state import XdsResources
    from planemesh.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE
    from planemesh.xds.translate import TranslationCache, translate

    def resources(t: dict[str, list]) -> XdsResources:
        def named(kind: str, key: str = "name") -> MappingProxyType:
            return MappingProxyType({getattr(r, key): r for r in t[kind]})

        return XdsResources(listeners=named(LISTENER), routes=named(ROUTE), clusters=named(CLUSTER),
                            endpoints=named(ENDPOINT, "cluster_name"), versions={"LDS": "1"})  # fmt: skip

    planes = load_default_config().planes
    cache, enc, dec = TranslationCache(), SnapshotEncoder(), SnapshotDecoder()
    current = typed(shape)
    tables: dict[str, Any] = {}
    steps = [("full", "")] + [(f"one {kind}", kind) for kind in ("endpoint", "route") for _ in range(changes)]
    print(f"{'step':14} {'translate':>10} {'encode':>8} {'bytes':>9} {'decode':>8} {'tables':>8}  routes compiled/kept")
    for k, (label, kind) in enumerate(steps):
        if kind:
            current = {**current, **one_change(shape, kind, k)}
        t0 = time.perf_counter()
        snap = translate(resources(current), planes, cache)
        t1 = time.perf_counter()
        body = enc.encode({"op": "snapshot", "snapshot": snap})
        t2 = time.perf_counter()
        got = dec.decode(body[4:])["snapshot"]
        t3 = time.perf_counter()
        for plane in planes:
            tables[plane.name] = RoutingTable(got, plane.name, previous=tables.get(plane.name))
        t4 = time.perf_counter()
        compiled = sum(t.router.reuse.routes_compiled for t in tables.values())
        reused = sum(t.router.reuse.routes_reused for t in tables.values())
        print(f"{label:14} {(t1 - t0) * 1000:8.1f}ms {(t2 - t1) * 1000:6.1f}ms {len(body):9d} "
              f"{(t3 - t2) * 1000:6.1f}ms {(t4 - t3) * 1000:6.1f}ms  {compiled}/{reused}")  # fmt: skip


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10, help="per cluster")
    parser.add_argument("--routes", type=int, default=10_000)
    parser.add_argument("--vhosts", type=int, default=1000, help="virtual hosts the routes are spread over")
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--no-envoy", action="store_true")
    parser.add_argument("--in-process", action="store_true", help="no lab: the steps of an update in this process")
    args = parser.parse_args(argv)
    if min(args.clusters, args.endpoints, args.routes, args.vhosts) < 1 or args.changes < 0:
        parser.error("sizes must be >= 1, --changes >= 0")
    shape = Shape(clusters=args.clusters, endpoints=args.endpoints, routes=args.routes, vhosts=args.vhosts)
    if args.in_process:
        in_process(shape, args.changes)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench scale needs root (a netns lab); --in-process runs without")
    runs, envoy = lab_runs(shape, args.changes, not args.no_envoy)
    print("\n".join(report(runs, envoy)))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

