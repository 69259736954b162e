"""The gRPC receive limit: a whole istiod push can exceed 64 MiB (Envoy took 70 MiB); the default is
256 MiB, a bootstrap setting (server.max_receive_bytes), and going over it is reported by name."""

from __future__ import annotations

import asyncio

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from planemesh.xds.bootstrap import bootstrap_from_dict
from planemesh.xds.resources import CLUSTER
from planemesh.xds.transport import XdsClient
from tests.support.clusters import LOOPBACK_PLANES as PLANES
from tests.support.clusters import cluster_doc, packed
from tests.support.waiting import until

T = "type.googleapis.com/"


class ScriptedAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """A real gRPC ADS server (the limit under test is gRPC's) answering the client's CDS subscription with one
    scripted response per ACK/NACK it receives."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.answers: list[discovery_pb2.DiscoveryRequest] = []

    async def StreamAggregatedResources(self, request_iterator, context):
        while (req := await context.read()) is not grpc.aio.EOF:
            if req.type_url != CLUSTER and not (req.response_nonce and req.response_nonce.startswith("s")):
                continue
            if req.response_nonce:
                self.answers.append(req)
            if self.script:
                item = self.script.pop(0)
                for resp in item if isinstance(item, list) else [item]:
                    await context.write(resp)


def _big(size: int) -> discovery_pb2.DiscoveryResponse:
    """A response of about `size` bytes, of a type the client ignores (only the gRPC limit matters)."""
    chunk = any_pb2.Any(type_url=T + "example.Padding", value=b"x" * (1 << 20))
    return discovery_pb2.DiscoveryResponse(
        type_url=T + "example.Padding", version_info="big", nonce="s-big", resources=[chunk] * (size >> 20)
    )


def _run(big_size: int, **server_settings):
    good = discovery_pb2.DiscoveryResponse(
        type_url=CLUSTER, version_info="1", nonce="s1", resources=packed(cluster_doc("after"))
    )
    ads = ScriptedAds([[_big(big_size), good]])

    async def scenario():
        server = grpc.aio.server(options=[("grpc.max_send_message_length", -1)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        boot = bootstrap_from_dict(
            {
                "node": {"id": "big"},
                "server": {"address": f"127.0.0.1:{port}", **server_settings},
                "timing": {"backoff_base_s": 0.05, "backoff_max_s": 0.2},
                "planes": PLANES,
            }
        )
        client = XdsClient(boot, _ignore)
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: ads.answers or client.last_error, 30, "an ACK or an error")
            return client
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(0)

    return asyncio.run(scenario()), ads


async def _ignore(snapshot) -> None:
    return None


def test_a_70_mib_response_is_received_by_default():
    client, ads = _run(70 << 20)
    assert client.last_error is None or "RESOURCE_EXHAUSTED" not in client.last_error
    assert [a.response_nonce for a in ads.answers] == ["s1"] and client.streams == 1
    assert "after" in client.snapshot.clusters


def test_over_the_configured_limit_is_reported_by_its_setting():
    client, _ads = _run(3 << 20, max_receive_bytes=2 << 20)
    assert "RESOURCE_EXHAUSTED" in client.last_error and "server.max_receive_bytes" in client.last_error
    assert client.snapshot is None
