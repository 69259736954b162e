"""The management server over real gRPC, seen by a raw ADS client: Delta's empty wildcard and names that
do not exist, resources of types and extensions the server does not know, bearer-token authentication."""

from __future__ import annotations

import asyncio

import grpc
import yaml
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from planemesh.xds.resources import CLUSTER, ENDPOINT, LISTENER, TYPED_STRUCT
from planemesh.xds.server import ManagementServer
from tests.support.clusters import cluster_doc
from tests.xds.xds_harness import write_resources

T = "type.googleapis.com/"
EXTENSION_CONFIG = T + "envoy.config.core.v3.TypedExtensionConfig"


class RawDelta:
    """A Delta ADS stream written by hand: requests in, responses read with a timeout."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).DeltaAggregatedResources()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:  # cancelling a pending read would cancel the whole call
        while (msg := await self.call.read()) is not grpc.aio.EOF:
            self.queue.put_nowait(msg)

    async def send(self, type_url: str, subscribe=(), unsubscribe=(), nonce: str = "") -> None:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            response_nonce=nonce,
        )
        req.node.id = "raw"
        await self.call.write(req)

    async def read(self, timeout: float = 3.0) -> discovery_pb2.DeltaDiscoveryResponse | None:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    async def close(self) -> None:
        self.reader.cancel()
        self.call.cancel()
        await self.channel.close()


def _run(resdir, body):
    async def scenario():
        server = ManagementServer(resdir, poll_interval_s=0.05)
        raw = RawDelta(await server.start("127.0.0.1:0"))
        try:
            return await body(server, raw)
        finally:
            await raw.close()
            await server.stop(0)

    return asyncio.run(scenario())


def test_delta_answers_an_empty_wildcard_subscription(tmp_path):
    """istio-agent's Envoy subscribes to CDS/LDS with Delta wildcard: an empty answer ends its init."""

    async def body(server, raw):
        await raw.send(CLUSTER, ["*"])
        first = await raw.read()
        assert first is not None, "no answer to an empty wildcard: Envoy would stay PRE_INITIALIZING"
        assert first.type_url == CLUSTER and list(first.resources) == [] and list(first.removed_resources) == []
        await raw.send(CLUSTER, nonce=first.nonce)  # the ACK
        assert await raw.read(0.5) is None  # nothing more until something changes

    _run(None, body)


def test_delta_reports_names_that_do_not_exist_in_removed_resources(tmp_path):
    write_resources(tmp_path, "c.yaml", [cluster_doc("a")])
    cla = {"@type": ENDPOINT, "cluster_name": "a", "endpoints": []}
    write_resources(tmp_path, "e.yaml", [cla])

    async def body(server, raw):
        await raw.send(ENDPOINT, ["a", "ghost"])
        resp = await raw.read()
        assert [r.name for r in resp.resources] == ["a"] and list(resp.removed_resources) == ["ghost"]
        await raw.send(ENDPOINT, nonce=resp.nonce)
        assert await raw.read(0.5) is None  # told once, not on every push
        write_resources(tmp_path, "e.yaml", [cla, dict(cla, cluster_name="ghost")])
        resp = await raw.read()
        assert [r.name for r in resp.resources] == ["ghost"] and list(resp.removed_resources) == []
        await raw.send(ENDPOINT, nonce=resp.nonce, subscribe=["other"])
        resp = await raw.read()
        assert list(resp.resources) == [] and list(resp.removed_resources) == ["other"]

    _run(tmp_path, body)


def test_resources_of_unknown_types_and_extensions_are_served_not_refused(tmp_path):
    istio_stats = {
        "name": "istio.stats",
        "typed_config": {"@type": T + "stats.PluginConfig", "disable_host_header_fallback": True},
    }
    listener = {
        "@type": LISTENER,
        "name": "virtualInbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
        "filter_chains": [{"filters": [istio_stats]}],
    }
    ecds = {  # a type the server has no special knowledge of, but protobuf has
        "@type": EXTENSION_CONFIG,
        "name": "ext-1",
        "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
    }
    opaque = {"@type": T + "example.Unknown", "@name": "blob", "@value_base64": "CgRibG9i"}
    write_resources(tmp_path, "istio.yaml", [listener, ecds, opaque, cluster_doc("c1")])

    async def body(server, raw):
        assert server.load_error is None
        await raw.send(LISTENER, ["*"])
        resp = await raw.read()
        lsn = listener_pb2.Listener()
        resp.resources[0].resource.Unpack(lsn)
        typed = lsn.filter_chains[0].filters[0].typed_config
        assert typed.type_url == TYPED_STRUCT and b"stats.PluginConfig" in typed.value
        for type_url, name in ((EXTENSION_CONFIG, "ext-1"), (T + "example.Unknown", "blob")):
            await raw.send(type_url, [name])
            got = await raw.read()
            assert [r.name for r in got.resources] == [name] and got.resources[0].resource.type_url == type_url
        assert got.resources[0].resource.value == b"\n\x04blob"

    _run(tmp_path, body)


def test_a_broken_file_still_refuses_the_set_with_a_clear_error(tmp_path):
    write_resources(tmp_path, "bad.yaml", [{"@type": T + "example.Unknown", "name": "x"}])

    async def body(server, raw):
        assert server.load_error and "example.Unknown" in server.load_error and "@value_base64" in server.load_error

    _run(tmp_path, body)


def test_our_delta_client_stops_waiting_when_the_server_says_a_route_does_not_exist():
    """Both halves together: the listener names a route configuration nobody has; the server's
    removed_resources ends the client's warming wait at once (not after initial_fetch_timeout), the other
    listener is applied and LDS ACKed, the orphan listener reported as warming."""
    from planemesh.xds.bootstrap import bootstrap_from_dict
    from planemesh.xds.resources import parse_resource_text, unpack
    from planemesh.xds.transport import XdsClient
    from tests.support.clusters import LOOPBACK_PLANES as PLANES
    from tests.support.waiting import until
    from tests.unit.test_xds_translate import PASS, http_listener

    def msgs(*docs):
        return [unpack(p, p.type_url) for p in parse_resource_text(yaml.safe_dump(list(docs)), "t")]

    async def scenario():
        server = ManagementServer(None)
        server.set_resources(CLUSTER, msgs({**PASS}))
        server.set_resources(
            LISTENER, msgs(http_listener("orphan", address="127.0.0.1", rds="r9"), http_listener("ok", port=81))
        )
        address = await server.start("127.0.0.1:0")
        boot = bootstrap_from_dict(
            {"node": {"id": "d"}, "server": {"address": address, "mode": "delta"}, "planes": PLANES,
             "timing": {"initial_fetch_timeout_s": 30}}
        )  # fmt: skip
        applied: list = []

        async def apply(snapshot):
            applied.append(snapshot)

        client = XdsClient(boot, apply)
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: applied, 5, "an update applied well before the 30 s fetch timeout")
            await until(lambda: server.clients()[0].types["LDS"].acks, 5, "the LDS ACK")
            return client, applied[-1], server.clients()[0].types["LDS"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(0)

    client, snap, lds = asyncio.run(scenario())
    assert {x.name.split("@")[0] for x in snap.listeners} == {"ok"} and lds.nacks == 0
    assert client.status()["warming_listeners"] == ["orphan"]
