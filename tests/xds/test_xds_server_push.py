"""ManagementServer.set_resources over real gRPC: pushed at once, bad input refused, Delta resends one resource."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from bench.xds_scale import Recorder, bootstrap, eds_cluster, load_assignment
from planemesh.xds.resources import CLUSTER, ENDPOINT, ResourceError
from planemesh.xds.server import ManagementServer
from planemesh.xds.transport import XdsClient

NAMES = [f"svc-{i}" for i in range(50)]


def test_set_resources_refuses_bad_input_and_changes_nothing() -> None:
    server = ManagementServer(None)
    server.set_resources(CLUSTER, [eds_cluster("a")])
    version = server.version
    for bad in ([eds_cluster("a"), eds_cluster("a")], [cluster_pb2.Cluster()], [load_assignment("x", 0, 1)]):
        with pytest.raises(ResourceError):
            server.set_resources(CLUSTER, bad)
    with pytest.raises(ResourceError):
        server.set_resources("type.googleapis.com/nope", [])
    assert server.version == version and set(server.resources[CLUSTER]) == {"a"}
    assert server.set_resources(CLUSTER, [eds_cluster("a")]) is False  # same content: no new version


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_one_changed_endpoint_set_is_pushed_and_delta_resends_only_it(mode: str) -> None:
    async def scenario() -> tuple[dict, object]:
        server = ManagementServer(None)
        server.set_resources(CLUSTER, [eds_cluster(n) for n in NAMES])
        cla = [load_assignment(n, i, 3) for i, n in enumerate(NAMES)]
        server.set_resources(ENDPOINT, cla)
        rec = Recorder()
        client = XdsClient(bootstrap(await server.start("127.0.0.1:0"), mode), rec.apply)
        task = asyncio.create_task(client.run())
        try:
            await rec.wait_for(lambda s: len(s.clusters) == len(NAMES), 10)
            await asyncio.sleep(0.2)  # ACKs in
            before = server.clients()[0].types["EDS"]
            sent_before = (before.responses, before.resources_sent, before.bytes_sent)
            cla[7] = load_assignment(NAMES[7], 7, 3, bump=5)
            server.set_resources(ENDPOINT, cla)
            snap = await rec.wait_for(lambda s: s.clusters[NAMES[7]].endpoints[0].port == 10000 + 7 * 16 + 5, 10)
            assert snap
            eds = server.clients()[0].types["EDS"]
            delta = (eds.responses - sent_before[0], eds.resources_sent - sent_before[1])
            return {"sent": delta, "bytes": eds.bytes_sent - sent_before[2]}, client
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(0)

    wire, client = asyncio.run(scenario())
    assert wire["sent"] == ((1, 1) if mode == "delta" else (1, len(NAMES)))
    assert wire["bytes"] > 0
    cache = client.translation_cache
    # Only the changed cluster was translated again. SotW resent every ClusterLoadAssignment as a new message:
    # the cache recognises the unchanged ones by their bytes.
    assert (cache.misses, cache.hits) == (len(NAMES) + 1, len(NAMES) - 1)
    assert client.status()["types"]["EDS"]["nacks"] == 0
