"""One node, many workloads: N local workloads x 3 planes on one agent, one ADS stream each.

    python -m bench workloads [--workloads 100] [--variants 5] [--settle 3] [--no-envoy]

A lab node with three planes runs the agent with a bootstrap `workloads:` section (source: file); the
management server (in this process, over a unix socket) serves every workload istiod-shaped resources (the
istio lab's push: virtualOutbound, virtualInbound, an outbound HTTP listener with a VirtualService split and
fault, EDS clusters), and `--variants` groups of workloads get their own route configuration (a different
split): N streams, `variants` distinct configurations. The workloads are declared in the workloads file with
an address on each plane (they need not exist as pods: none sends traffic). Measured:
- streams: connected streams the server sees;
- apply: workloads file written -> the agent applied all N workloads' merged configuration (its log), and a
  change of a resource every workload shares -> every stream ACKed it;
- merge: in process, one pod's push merged for N pods, and what the agent derives from it (validation, BPF
  policy, a routing table per plane);
- memory: RSS of the agent and its workers with N workloads minus with one, per workload; beside it one
  Envoy 1.40 sidecar (--concurrency 1) given one workload's configuration: what each pod pays with sidecars.
Every packet stays on loopback or inside the lab's namespaces. Benchmarks measure, they do not assert.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.footprint import rss_kb
from planemesh.agent.identity.ca import new_root
from planemesh.agent.proxy.routing_table import RoutingTable
from planemesh.agent.workloads.merge import merge
from planemesh.agent.workloads.model import Workload
from planemesh.ebpf.policy import policy_from_snapshot
from planemesh.labs import procs
from planemesh.labs.envoy_resources import by_type
from planemesh.model.static_config import default_config_text, snapshot_from_dict
from planemesh.model.validation import validate_snapshot
from planemesh.xds.client_state import XdsResources
from planemesh.xds.conformance import strip_istio
from planemesh.xds.per_resource import translate_update
from planemesh.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, resource_name
from planemesh.xds.sds import SecretIssuer
from planemesh.xds.server import ManagementServer
from tests.netns.agent_lab import eventually, running_agent
from tests.netns.test_istio_lab import PORT, SVC, istiod_push
from tests.xds.xds_harness import Envoy, LoopThread, free_port

SIG = {"name": "sig", "id": 3, "interfaces": ["*-sig"], "cidrs": ["198.18.3.0/24", "fd00:18:3::/64"],
       "undeclared": "bypass", "proxy_port": 15021, "sniff_port": 15022}  # fmt: skip
LAB = {"name": "wlbench", "planes": [
    {"name": "oam", "ipv4": "198.18.1.0/24", "ipv6": "fd00:18:1::/64"},
    {"name": "media", "ipv4": "198.18.2.0/24", "ipv6": "fd00:18:2::/64"},
    {"name": "sig", "ipv4": "198.18.3.0/24", "ipv6": "fd00:18:3::/64"},
], "pods": [{"name": "client", "planes": ["oam", "media", "sig"]},
            {"name": "server", "planes": ["oam", "media", "sig"]}]}  # fmt: skip
APPLIED = re.compile(
    r"applied (\d+) workloads' configuration in ([\d.]+) ms: (\d+) listeners, (\d+) route configurations, (\d+) clu"
)


def workloads_doc(n: int) -> dict[str, Any]:
    """N workloads, each with one address per plane (hosts 100.. of each plane's subnet: no pod has them)."""
    return {"workloads": [{"name": f"wl{i:03d}", "namespace": "default", "labels": {"app": f"wl{i % 10}"},
                           "addresses": [f"198.18.{p}.{100 + i}" for p in (1, 2, 3)]} for i in range(n)]}  # fmt: skip


def variant_route(docs: list[dict], group: int) -> dict:
    """The push's route configuration with another split (group g: v1 weight 90 - g)."""
    rc = copy.deepcopy(next(d for d in docs if d["@type"].endswith("RouteConfiguration")))
    for vh in rc["virtual_hosts"]:
        for r in vh["routes"]:
            weighted = r.get("route", {}).get("weighted_clusters")
            if weighted:
                weighted["clusters"] = [{"name": f"outbound|{PORT}|v1|{SVC}", "weight": 90 - group},
                                        {"name": f"outbound|{PORT}|v2|{SVC}", "weight": 10 + group}]  # fmt: skip
    return rc


def istiod() -> ManagementServer:
    """The management server with istiod's SDS part: each stream's `default`/`ROOTCA` from a built-in CA, for
    the identity its node metadata names (NAMESPACE, SERVICE_ACCOUNT), as istio-agent serves them."""
    return ManagementServer(None, secrets=SecretIssuer(new_root("cluster.local", now=dt.datetime.now(dt.UTC))))


def merge_cost(n: int, planes_raw: list[dict]) -> dict[str, float]:
    """In process: one pod's push translated once, merged for N pods (3 planes), then what Agent.apply derives
    from the result (validation, BPF policy, one routing table per plane). Milliseconds."""
    docs = by_type(istiod_push("198.18.1.11"))
    named = {t: {resource_name(m): m for m in ms} for t, ms in docs.items()}
    planes = snapshot_from_dict({"planes": planes_raw}, version="bench").planes
    res = XdsResources(named.get(LISTENER, {}), named.get(ROUTE, {}), named.get(CLUSTER, {}),
                       named.get(ENDPOINT, {}), {"LDS": "1", "CDS": "1"})  # fmt: skip
    snap = translate_update(res, planes).snapshot
    pods = [Workload(f"wl{i:03d}", "default", tuple(f"198.18.{p}.{100 + i}" for p in (1, 2, 3))) for i in range(n)]
    views = {w.key: (w, snap) for w in pods}
    t0 = time.perf_counter()
    merged = merge(planes, views, "bench").snapshot
    t1 = time.perf_counter()
    validate_snapshot(merged)
    policy_from_snapshot(merged)
    for plane in planes:
        RoutingTable(merged, plane.name)
    t2 = time.perf_counter()
    return {"merge_ms": round((t1 - t0) * 1000, 1), "validate_policy_tables_ms": round((t2 - t1) * 1000, 1)}


def memory_kb(pid: int) -> int:
    """The agent's RSS plus its zygote's and workers' (exec'd or forked)."""
    return rss_kb(pid) + sum(rss_kb(c) for c in (*procs.zygotes(pid), *procs.worker_pids(pid)))


def _write(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)


def _applied(output: str, n: int) -> tuple[float, int, int, int] | None:
    for m in reversed(list(APPLIED.finditer(output))):
        if int(m.group(1)) == n:
            return float(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5))
    return None


def envoy_sidecar_kb(docs: list[dict], settle: float) -> int | None:
    """One Envoy 1.40 (--concurrency 1) fed one workload's resources over ADS on loopback: its RSS (a lower
    bound: see below)."""
    loop = LoopThread()
    server = istiod()
    try:
        port = free_port()
        loop.run(server.start(f"127.0.0.1:{port}"))

        async def serve() -> None:
            for type_url, msgs in by_type(docs).items():
                server.set_resources(type_url, msgs)

        loop.run(serve())
        with tempfile.TemporaryDirectory() as tmp:
            node = "sidecar~198.18.1.100~wl000.default~default.svc.cluster.local"
            # istio_agent: no wait for readiness. The push's clusters fetch their certificates from istio-agent's
            # SDS socket (`sds-grpc`), which this bootstrap lacks: they stay warming and Envoy holds no listener,
            # so its RSS here is a lower bound of a sidecar's.
            envoy = Envoy(Path(tmp), port, node, False, istio_agent=True)
            try:
                time.sleep(settle + 2)
                dump = envoy.config_dump()
                print(f"envoy: {envoy.state()}, " + ", ".join(f"{len(v)} {k}" for k, v in dump.items()))
                return rss_kb(envoy.proc.pid)
            finally:
                envoy.proc.terminate()
                envoy.proc.wait(10)
    except (OSError, AssertionError) as exc:
        print(f"envoy: not measured ({exc})")
        return None
    finally:
        loop.run(server.stop())
        loop.close()


def run(n: int, variants: int, settle: float) -> dict[str, Any]:
    out: dict[str, Any] = {"workloads": n, "planes": 3, "variants": variants}
    loop = LoopThread()
    server = istiod()
    with tempfile.TemporaryDirectory(prefix="pm-wlbench-") as tmp:
        work = Path(tmp)
        lab_file, wl_file, boot = work / "lab.yaml", work / "workloads.yaml", work / "bootstrap.yaml"
        lab_file.write_text(yaml.safe_dump(LAB))
        wl_file.write_text("workloads: []\n")
        address = loop.run(server.start(f"unix://{work / 'xds.sock'}"))
        planes = [*yaml.safe_load(default_config_text())["planes"], SIG]
        boot.write_text(yaml.safe_dump({
            "node": {"id": "bench"}, "server": {"address": address}, "planes": planes,
            "workloads": {"source": "file", "file": str(wl_file), "poll_interval_s": 0.2},
        }))  # fmt: skip
        docs = istiod_push("198.18.1.11")  # endpoints: the lab's server pod (no traffic is sent)
        out["resources_per_workload"] = len(docs)

        async def serve() -> None:
            for type_url, msgs in by_type(docs).items():
                server.set_resources(type_url, msgs)
            for i in range(n):
                if (group := i % variants) != 0:
                    server.set_node_resources(f"wl{i:03d}.default", ROUTE, by_type([variant_route(docs, group)])[ROUTE])

        async def streams() -> int:
            return sum(1 for c in server.clients() if c.connected)

        async def acked(version: str) -> int:
            return sum(1 for c in server.clients() if c.connected and c.types.get("RDS")
                       and c.types["RDS"].acked_version.split(".")[0] == version)  # fmt: skip

        loop.run(serve())
        with running_agent(f"pmwl{secrets.token_hex(2)}", ["--bootstrap", str(boot)], lab_file=str(lab_file)) as env:
            # baseline: one workload (its first configuration starts the planes' sniffing listeners)
            _write(wl_file, workloads_doc(1))
            eventually(lambda: _applied(env.agent_output(), 1), timeout=60, interval=0.05)
            time.sleep(settle)
            base = memory_kb(env.agent.pid)
            started = time.monotonic()
            _write(wl_file, workloads_doc(n))
            applied = eventually(lambda: _applied(env.agent_output(), n), timeout=120, interval=0.05)
            out["file_to_applied_s"] = round(time.monotonic() - started, 2)
            if applied:
                out["last_merge_apply_ms"], out["listeners"], out["route_configs"], out["clusters"] = applied
            out["streams"] = loop.run(streams())
            time.sleep(settle)
            after = memory_kb(env.agent.pid)
            out["agent_mb_1"], out["agent_mb_n"] = round(base / 1024, 1), round(after / 1024, 1)
            out["kb_per_workload"] = round((after - base) / max(1, n - 1), 1)
            # a change every workload shares: the split of the common route configuration
            new = variant_route(docs, 7)

            async def change() -> str:
                server.set_resources(ROUTE, by_type([new])[ROUTE])
                return str(server.type_versions[ROUTE])

            started = time.monotonic()
            version = loop.run(change())
            eventually(lambda: loop.run(acked(version)) >= n, timeout=60, interval=0.02)  # SotW: every stream
            out["shared_change_acked_s"] = round(time.monotonic() - started, 2)
        loop.run(server.stop())
        loop.close()
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench workloads")
    parser.add_argument("--workloads", type=int, default=100)
    parser.add_argument("--variants", type=int, default=5, help="distinct route configurations among them")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before each RSS sample")
    parser.add_argument("--no-envoy", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.workloads <= 150 or not 1 <= args.variants <= args.workloads:
        parser.error("--workloads 1..150 (addresses .100-.249), --variants 1..workloads")
    planes = [*yaml.safe_load(default_config_text())["planes"], SIG]
    result = {**run(args.workloads, args.variants, args.settle), **merge_cost(args.workloads, planes)}
    if not args.no_envoy:
        kb = envoy_sidecar_kb([strip_istio(d) for d in istiod_push("198.18.1.11")], args.settle)
        if kb is not None:
            result["envoy_sidecar_mb"] = round(kb / 1024, 1)
            result["sidecars_mb_n"] = round(kb * args.workloads / 1024, 1)
    for key, value in result.items():
        print(f"{key:24} {value}")
