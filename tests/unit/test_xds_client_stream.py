"""The XdsClient's stream logic on the in-memory ADS server (tests/support/ads.py): NACKs with reasons, the
stream surviving bad input, reconnects keeping the applied configuration, and reconfigure() (SIGHUP with
--bootstrap). No gRPC server: what only gRPC does is tested in tests/xds/."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from planemesh.xds.bootstrap import bootstrap_from_dict
from planemesh.xds.grpc_wire import StatusCode
from planemesh.xds.resources import CLUSTER
from planemesh.xds.transport import XdsClient
from tests.support.ads import FakeAdsServer, FakeAdsStream, sotw_response
from tests.support.clusters import LOOPBACK_PLANES, cluster_doc, packed
from tests.support.waiting import until

T = "type.googleapis.com/"
PLANES = LOOPBACK_PLANES


def bootstrap(node_id: str = "n1", server: str = "fake:1", mode: str = "sotw"):
    return bootstrap_from_dict({
        "node": {"id": node_id},
        "server": {"address": server, "mode": mode},
        "timing": {"backoff_base_s": 0.05, "backoff_max_s": 0.2},
        "planes": PLANES,
    })  # fmt: skip


class Harness:
    def __init__(self, boot=None) -> None:
        self.ads = FakeAdsServer()
        self.applied: list = []
        self.client = XdsClient(boot or bootstrap(), self._apply, open_stream=self.ads.open_stream)

    async def _apply(self, snapshot) -> None:
        self.applied.append(snapshot)

    async def __aenter__(self) -> Harness:
        self.task = asyncio.create_task(self.client.run())
        return self

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def serve_clusters(stream: FakeAdsStream, version: str, *docs: dict) -> discovery_pb2.DiscoveryRequest:
    """Answer the stream's CDS subscription with `docs`; the client's answer (ACK or NACK)."""
    stream.respond(sotw_response(CLUSTER, version, f"n{version}", packed(*docs)))
    return await stream.request_for(CLUSTER)


def test_bad_responses_are_nacked_with_reasons_and_the_stream_survives() -> None:
    good = packed(cluster_doc("good"))

    async def scenario():
        async with Harness() as h:
            stream = await h.ads.next_stream()
            await stream.request_for(CLUSTER)  # the initial wildcard subscription
            # a type URL nobody subscribed to is ignored (Envoy): no answer
            stream.respond(discovery_pb2.DiscoveryResponse(type_url=T + "envoy.config.bogus.v3.Thing", nonce="x"))
            stream.respond(discovery_pb2.DiscoveryResponse(
                type_url=CLUSTER, version_info="2", nonce="s2",
                resources=[any_pb2.Any(type_url=CLUSTER, value=b"\x0a\xff\xff")]))  # fmt: skip
            answers = [await stream.request_for(CLUSTER)]
            stream.respond(sotw_response(CLUSTER, "3", "s3", good + good))
            answers.append(await stream.request_for(CLUSTER))
            answers.append(await serve_clusters(stream, "4", cluster_doc("ip", address="1.2.3.400")))
            answers.append(await serve_clusters(stream, "5", cluster_doc("port", port=0)))
            answers.append(await serve_clusters(stream, "6", cluster_doc("good")))
            return h, answers

    h, answers = asyncio.run(scenario())
    assert [(a.response_nonce, a.version_info) for a in answers] == [
        ("s2", ""), ("s3", ""), ("n4", ""), ("n5", ""), ("n6", "6")]  # fmt: skip
    reasons = [a.error_detail.message for a in answers]
    assert "cannot decode" in reasons[0]
    assert "'good': duplicate name" in reasons[1]
    assert "cluster[ip]" in reasons[2] and "not an IP" in reasons[2]
    assert "cluster[port]" in reasons[3] and "not a TCP port" in reasons[3]
    assert not answers[4].HasField("error_detail")
    assert h.client.state.ignored_responses == 1
    assert h.client.streams == 1  # never reconnected: bad input did not break the stream
    assert list(h.applied[-1].clusters) == ["good"] and h.client.status()["types"]["CDS"]["nacks"] == 4


@pytest.mark.parametrize("how", ["end", "fail"])
def test_a_lost_stream_keeps_the_applied_config_and_the_client_reconnects(how: str) -> None:
    async def scenario():
        async with Harness() as h:
            first = await h.ads.next_stream()
            await first.request_for(CLUSTER)
            await serve_clusters(first, "1", cluster_doc("one"))
            first.end() if how == "end" else first.fail(StatusCode.UNAVAILABLE, "gone")
            second = await h.ads.next_stream()
            again = await second.request_for(CLUSTER)
            return h, again

    h, again = asyncio.run(scenario())
    assert again.version_info == "1"  # SotW resubscribes with the version it holds
    assert h.client.snapshot is h.applied[-1] and "one" in h.client.snapshot.clusters
    assert len(h.applied) == 1 and h.client.streams == 2
    assert h.client.last_error == ("server closed the stream" if how == "end" else "UNAVAILABLE: gone")


def test_reconfigure_reconnects_with_the_new_bootstrap_and_keeps_serving_meanwhile() -> None:
    async def scenario():
        async with Harness(bootstrap("old-node")) as h:
            first = await h.ads.next_stream()
            hello = await first.request_for(CLUSTER)
            await serve_clusters(first, "1", cluster_doc("one"))
            assert h.client.reconfigure(bootstrap("old-node")) is False  # unchanged: nothing happens
            new = dataclasses.replace(bootstrap("new-node"), server="fake:2")
            assert h.client.reconfigure(new) is True
            second = await h.ads.next_stream()
            hello2 = await second.request_for(CLUSTER)
            served_meanwhile = h.client.snapshot
            await serve_clusters(second, "7", cluster_doc("two"))
            await until(lambda: "two" in h.client.snapshot.clusters, what="the new server's config")
            return h, first, second, hello, hello2, served_meanwhile

    h, first, second, hello, hello2, served_meanwhile = asyncio.run(scenario())
    assert first.cancelled and second.bootstrap.server == "fake:2" and h.client.status()["server"] == "fake:2"
    assert hello.node.id == "old-node" and hello2.node.id == "new-node"
    assert hello2.version_info == ""  # a fresh start with the new server: nothing claimed from the old one
    assert "one" in served_meanwhile.clusters  # the old snapshot kept serving until the new one applied
    assert len(h.ads.streams) == 2


def test_reconfigure_during_the_backoff_connects_at_once() -> None:
    async def scenario():
        boot = dataclasses.replace(bootstrap(), backoff_base_s=30.0, backoff_max_s=60.0)
        async with Harness(boot) as h:
            h.ads.refuse = StatusCode.UNAVAILABLE
            await h.ads.next_stream()
            await until(lambda: h.client.last_error, what="the refusal")  # now in a >= 15 s backoff
            h.ads.refuse = None
            h.client.reconfigure(dataclasses.replace(boot, server="fake:fixed"))
            stream = await h.ads.next_stream(timeout=2.0)
            return stream

    stream = asyncio.run(scenario())
    assert stream.bootstrap.server == "fake:fixed"
