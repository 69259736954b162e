"""One ADS stream per local workload against the real management server (gRPC over a unix socket): each
stream carries istio-agent's node id and metadata, the server answers each node with its own resources, the
merged node snapshot routes each workload's traffic by its own configuration, and a workload that goes away
closes its stream."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import yaml

from planemesh.agent.proxy.routing import PlaneRouter
from planemesh.agent.workloads.model import Workload, WorkloadSet
from planemesh.agent.workloads.settings import settings_from_dict
from planemesh.agent.workloads.sources import FileSource, SourceError
from planemesh.agent.workloads.streams import WorkloadStreams
from planemesh.labs.envoy_resources import (
    by_type,
    eds_cluster,
    http_listener,
    load_assignment,
    locality,
    route,
    route_config,
    write_resource_file,
)
from planemesh.model.config import ConfigError, Snapshot
from planemesh.model.static_config import load_default_config
from planemesh.xds.bootstrap import Bootstrap
from planemesh.xds.client_state import Mode
from planemesh.xds.server import ManagementServer

PLANES = load_default_config().planes
A, B = "198.18.1.10", "198.18.1.11"


def _shared() -> list[dict]:
    docs = [http_listener("0.0.0.0_80", 80, routes="80"), route_config([route(cluster="v1")], name="80")]
    for name, port in (("v1", 8081), ("v2", 8082)):
        docs += [eds_cluster(name), load_assignment(name, [locality([("198.18.1.50", port)])])]
    return docs


def _workloads_file(path: Path, names: list[str]) -> None:
    addresses = {"a": [A, "198.18.2.10"], "b": [B]}
    path.write_text(yaml.safe_dump({"workloads": [{"name": n, "addresses": addresses[n]} for n in names]}))


def _cluster(snap: Snapshot, src: str, dst: str = "198.18.1.50", port: int = 80) -> str | None:
    crc = PlaneRouter(snap, "oam").route_config(dst, port, src)
    return None if crc is None else snap.routes[crc.name].virtual_hosts[0].routes[0].action.cluster


async def _until(check, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := check()):
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return value


@contextlib.asynccontextmanager
async def _running(tmp_path: Path, apply, source, resources: Path | None = None, mode: str = "sotw"):
    """The management server (`resources`, or the shared set from code) and WorkloadStreams following
    `source`, torn down after."""
    server = ManagementServer(resources, poll_interval_s=0.05)
    if resources is None:
        for type_url, msgs in by_type(_shared()).items():
            server.set_resources(type_url, msgs)
    address = await server.start(f"unix://{tmp_path / 'xds.sock'}")
    boot = Bootstrap("node-1", "planemesh", address, PLANES, Mode(mode), backoff_base_s=0.05, backoff_max_s=0.2)
    settings = settings_from_dict({"source": "file", "file": "/unused", "poll_interval_s": 0.05}, {})
    streams = WorkloadStreams(boot, settings, apply)
    task = asyncio.create_task(streams.run(source))
    try:
        yield server, streams, task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.stop()


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_each_workload_gets_its_own_configuration(tmp_path: Path, mode: str) -> None:
    resources = tmp_path / "resources"
    (resources / "nodes" / "b.default").mkdir(parents=True)
    write_resource_file(resources / "shared.json", _shared())
    # b's sidecar would be told: port 80 goes to v2 (a different VirtualService for b, say)
    write_resource_file(resources / "nodes" / "b.default" / "routes.json", [route_config([route(cluster="v2")], "80")])
    wl_file = tmp_path / "workloads.yaml"
    _workloads_file(wl_file, ["a", "b"])

    async def scenario() -> None:
        applied: list[Snapshot] = []

        async def apply(snap: Snapshot) -> None:
            applied.append(snap)

        async with _running(tmp_path, apply, FileSource(str(wl_file), PLANES), resources, mode) as (server, streams, _):
            snap = await _until(
                lambda: applied and _cluster(applied[-1], B) and _cluster(applied[-1], A) and applied[-1]
            )
            assert snap.routes[PlaneRouter(snap, "oam").route_config("198.18.1.50", 80, A).name]
            assert _cluster(snap, A) == "v1" and _cluster(snap, B) == "v2"
            assert _cluster(snap, "198.18.1.99") is None  # not a workload of this node
            # what istiod reads: one stream per pod, istio-agent's node id and metadata
            live = {c.node_id: c for c in server.clients() if c.connected}
            node_b = "sidecar~198.18.1.11~b.default~default.svc.cluster.local"
            assert set(live) == {"sidecar~198.18.1.10~a.default~default.svc.cluster.local", node_b}
            meta = dict(live["sidecar~198.18.1.10~a.default~default.svc.cluster.local"].node.metadata)
            assert meta["INSTANCE_IPS"] == "198.18.1.10,198.18.2.10" and meta["INTERCEPTION_MODE"] == "TPROXY"
            assert meta["NAMESPACE"] == "default" and meta["ISTIO_VERSION"] and meta["CLUSTER_ID"] == "Kubernetes"
            assert streams.cache.hits > 0  # the clusters both streams received were translated once
            assert streams.decoder.hits > 0  # ... and decoded once: both streams hold the same messages
            # b goes away: its stream closes and its listeners leave the node's snapshot
            _workloads_file(wl_file, ["a"])
            await _until(lambda: not any(c.connected and c.node_id == node_b for c in server.clients()))
            snap = await _until(lambda: _cluster(applied[-1], B) is None and applied[-1])
            assert _cluster(snap, A) == "v1" and all(not lsn.name.endswith("~b.default") for lsn in snap.listeners)
            assert streams.status()["streams"] == 1 and streams.streams_closed == 1

    asyncio.run(scenario())


def test_a_refused_node_snapshot_nacks_the_streams_of_the_batch(tmp_path: Path) -> None:
    """The node refusing the merged snapshot (a ConfigError from the agent) NACKs the workload's update and
    keeps its previous configuration."""
    wl_file = tmp_path / "w.yaml"
    _workloads_file(wl_file, ["a"])

    async def scenario() -> None:
        refuse = {"on": False}
        applied: list[Snapshot] = []

        async def apply(snap: Snapshot) -> None:
            if refuse["on"]:
                raise ConfigError("listeners[0]", "refused by the node")
            applied.append(snap)

        async with _running(tmp_path, apply, FileSource(str(wl_file), PLANES)) as (server, streams, _):
            await _until(lambda: applied and _cluster(applied[-1], A) == "v1")
            refuse["on"] = True
            ((rds, messages),) = by_type([route_config([route(cluster="v2")], "80")]).items()
            server.set_node_resources("a.default", rds, messages)
            client = await _until(lambda: next((c for c in server.clients() if c.connected), None))
            report = await _until(lambda: client.types.get("RDS") and client.types["RDS"].nacks and client.types["RDS"])
            assert "refused by the node" in report.last_nack
            assert _cluster(streams.views["a.default"][1], A) == "v1"  # rolled back to what the node applied
            assert _cluster(applied[-1], A) == "v1" and streams.last_error and "refused" in streams.last_error

    asyncio.run(scenario())


def test_node_resources_from_code_and_directory_errors(tmp_path: Path) -> None:
    server = ManagementServer(tmp_path)
    (tmp_path / "nodes" / "x.default").mkdir(parents=True)
    (tmp_path / "nodes" / "x.default" / "bad.yaml").write_text("- {'@type': nope}\n")
    assert server.reload() is False and server.load_error and "nodes/x.default/bad.yaml" in server.load_error
    assert server.node_key("sidecar~1.2.3.4~x.default~default.svc.cluster.local") is None
    (tmp_path / "nodes" / "x.default" / "bad.yaml").write_text(yaml.safe_dump([route_config([route(cluster="c")])]))
    assert server.reload() is True and server.load_error is None
    assert server.node_key("sidecar~1.2.3.4~x.default~default.svc.cluster.local") == "x.default"
    assert server.node_key("sidecar~1.2.3.4~y.default~default.svc.cluster.local") is None
    (tmp_path / "nodes" / "x.default" / "bad.yaml").unlink()
    assert server.reload() is True and server.node_resources == {}


def test_one_merged_apply_at_a_time(tmp_path: Path) -> None:
    """Ten streams starting together: their updates are merged into few applies, never two at once (an apply
    arriving while one runs waits in the next batch)."""
    wl_file = tmp_path / "w.yaml"
    wl_file.write_text(yaml.safe_dump({"workloads": [
        {"name": f"p{i}", "addresses": [f"198.18.1.{20 + i}"]} for i in range(10)]}))  # fmt: skip

    async def scenario() -> None:
        running, most, applied = 0, 0, []

        async def apply(snap: Snapshot) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.2)  # a slow node
            running -= 1
            applied.append(snap)

        async with _running(tmp_path, apply, FileSource(str(wl_file), PLANES)):
            await _until(lambda: applied and applied[-1].version.startswith("xds:LDS=w,CDS=w,workloads=10:"))
            assert most == 1 and len(applied) < 10, (most, len(applied))

    asyncio.run(scenario())


def test_a_failing_source_never_ends_the_streams(tmp_path: Path) -> None:
    """A source raising (its own error or a bug) keeps the last good workloads and their streams."""

    class Flaky:
        def __init__(self) -> None:
            self.calls = 0

        async def read(self) -> WorkloadSet:
            self.calls += 1
            if self.calls % 2 == 0:
                raise RuntimeError("a bug in the source") if self.calls % 4 == 0 else SourceError("API down")
            return WorkloadSet({"a.default": Workload("a", "default", (A,))})

    async def scenario() -> None:
        applied: list[Snapshot] = []

        async def apply(snap: Snapshot) -> None:
            applied.append(snap)

        source = Flaky()
        async with _running(tmp_path, apply, source) as (_server, streams, task):
            await _until(lambda: source.calls >= 6 and applied and _cluster(applied[-1], A) == "v1")
            assert not task.done() and list(streams.clients) == ["a.default"] and streams.streams_opened == 1

    asyncio.run(scenario())
