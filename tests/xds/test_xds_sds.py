"""SDS from the management server over real gRPC: a raw ADS stream (SotW and Delta) gets `default` and `ROOTCA`
for its node's identity and the rotated certificate at half-life; a real Envoy 1.40 fetches both over ADS and
terminates mTLS with them, accepting a client certificate from the same CA and refusing one from another."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import subprocess
import threading
import time

import grpc
import pytest
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from planemesh.agent.identity.ca import key_pem, load_certs, new_root, spiffe_ids, utcnow, verify_workload
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.xds.resources import SECRET
from planemesh.xds.sds import SecretIssuer, node_metadata
from planemesh.xds.server import ManagementServer
from tests.xds.xds_harness import Envoy, free_port, wait_for, write_resources

T = "type.googleapis.com/"
NODE = base_pb2.Node(id="amf-1", metadata=node_metadata("ran", "amf"))


def _certs(resp) -> dict[str, secret_pb2.Secret]:
    out = {}
    for item in resp.resources:
        msg = secret_pb2.Secret()
        (item.resource if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse) else item).Unpack(msg)
        out[msg.name] = msg
    return out


def _leaf(secret: secret_pb2.Secret):
    return load_certs(secret.tls_certificate.certificate_chain.inline_bytes, "chain")


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_node_gets_its_certificate_and_the_rotated_one(mode: str) -> None:
    async def scenario() -> tuple[list, list]:
        root = new_root("cluster.local", now=utcnow())
        server = ManagementServer(None, secrets=SecretIssuer(root, ttl_s=3))  # rotation after 1.5 s
        address = await server.start("127.0.0.1:0")
        channel = grpc.aio.insecure_channel(address)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        requests: asyncio.Queue = asyncio.Queue()
        names = ["ROOTCA", "default"]
        if mode == "delta":
            await requests.put(
                discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=SECRET, resource_names_subscribe=names)
            )
            call = stub.DeltaAggregatedResources(_drain(requests))
        else:
            await requests.put(discovery_pb2.DiscoveryRequest(node=NODE, type_url=SECRET, resource_names=names))
            call = stub.StreamAggregatedResources(_drain(requests))
        got = []
        try:
            started = time.monotonic()
            async for resp in call:
                got.append((time.monotonic() - started, _certs(resp)))
                ack = {"type_url": SECRET, "response_nonce": resp.nonce}
                if mode == "delta":
                    await requests.put(discovery_pb2.DeltaDiscoveryRequest(**ack))
                else:
                    await requests.put(
                        discovery_pb2.DiscoveryRequest(version_info=resp.version_info, resource_names=names, **ack)
                    )
                if len(got) == 2:
                    break
        finally:
            call.cancel()
            await channel.close()
            await server.stop(0)
        return got, [root.cert]

    got, roots = asyncio.run(asyncio.wait_for(scenario(), 20))
    (t0, first), (t1, second) = got
    assert set(first) == {"default", "ROOTCA"} and t0 < 1.0
    chain = _leaf(first["default"])
    assert str(verify_workload(chain[0], chain[1:], roots, utcnow())) == "spiffe://cluster.local/ns/ran/sa/amf"
    assert set(second) == {"default"} if mode == "delta" else set(second) == {"default", "ROOTCA"}
    rotated = _leaf(second["default"])[0]
    assert 0.9 < t1 < 2.9, t1  # pushed at half-life (X.509 times are whole seconds: 1.0 .. 1.5 s), before expiry
    assert rotated.serial_number != chain[0].serial_number and spiffe_ids(rotated) == spiffe_ids(chain[0])


async def _drain(queue: asyncio.Queue):
    while True:
        yield await queue.get()


def _tls_listener(port: int) -> dict:
    sds = {"ads": {}, "resource_api_version": "V3"}
    return {
        "@type": T + "envoy.config.listener.v3.Listener",
        "name": "mtls",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": True,
                        "common_tls_context": {
                            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds}],
                            "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": sds},
                        },
                    },
                },
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": T
                            + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "mtls",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"prefix": "/"},
                                                "direct_response": {"status": 200, "body": {"inline_string": "hi"}},
                                            }
                                        ],
                                    }
                                ]
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
                                }
                            ],
                        },
                    }
                ],
            }
        ],
    }


def test_envoy_terminates_mtls_with_certificates_from_our_sds(tmp_path) -> None:
    root = new_root("cluster.local", now=utcnow())
    other = new_root("cluster.local", now=utcnow())
    port = free_port()
    write_resources(tmp_path, "lds.yaml", [_tls_listener(port)])
    loop = asyncio.new_event_loop()
    server = ManagementServer(tmp_path, secrets=SecretIssuer(root, ttl_s=3600))
    address = loop.run_until_complete(server.start("127.0.0.1:0"))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    envoy = Envoy(tmp_path, int(address.rsplit(":", 1)[1]), "gw-1", delta=False)
    try:
        wait_for(lambda: "mtls" in envoy.config_dump()["listeners"], 15, "envoy listener warmed by SDS")
        for name, ca in (("good", root), ("foreign", other)):
            issued = ca.issue(parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/smf"), now=utcnow())
            (tmp_path / f"{name}.pem").write_bytes(issued.cert_chain_pem())
            (tmp_path / f"{name}.key").write_bytes(key_pem(issued.key))
        (tmp_path / "root.pem").write_bytes(root.root_pem())

        def curl(name: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["curl", "-sS", "--max-time", "5", "--cacert", tmp_path / "root.pem", "--cert",
                 tmp_path / f"{name}.pem", "--key", tmp_path / f"{name}.key", "--resolve",
                 f"gw:{port}:127.0.0.1", f"https://gw:{port}/", "-o", "-", "-w", " %{http_code}"],
                capture_output=True, text=True, check=False)  # fmt: skip

        # curl checks a DNS name; Envoy's certificate has only a SPIFFE URI: verify it ourselves instead.
        ctx = ssl.create_default_context(cafile=str(tmp_path / "root.pem"))
        ctx.check_hostname = False
        ctx.load_cert_chain(tmp_path / "good.pem", tmp_path / "good.key")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            peer = tls.getpeercert(binary_form=True)
            tls.sendall(b"GET / HTTP/1.1\r\nhost: gw\r\nconnection: close\r\n\r\n")
            reply = b""
            while chunk := tls.recv(4096):
                reply += chunk
        assert spiffe_ids(x509.load_der_x509_certificate(peer)) == ["spiffe://cluster.local/ns/default/sa/gw-1"]
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hi")
        refused = curl("foreign")
        assert refused.returncode != 0 and " 200" not in refused.stdout  # a certificate of another CA
        assert server.secrets.issued == 1
        assert dt.timedelta(hours=1) >= server.secrets._nodes[parse_spiffe_id(
            "spiffe://cluster.local/ns/default/sa/gw-1")].issued.not_after - utcnow()  # fmt: skip
    finally:
        envoy.stop()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_our_client_fetches_secrets_for_its_tls_listener_and_gets_the_rotation(mode: str) -> None:
    from bench.xds_scale import Recorder, bootstrap
    from planemesh.xds.resources import LISTENER
    from planemesh.xds.transport import XdsClient
    from tests.unit.test_xds_sds_client import _listener_msg

    async def scenario() -> list:
        root = new_root("cluster.local", now=utcnow())
        server = ManagementServer(None, secrets=SecretIssuer(root, ttl_s=3))
        server.set_resources(LISTENER, [_listener_msg()])
        rec = Recorder()
        client = XdsClient(bootstrap(await server.start("127.0.0.1:0"), mode), rec.apply)
        task = asyncio.create_task(client.run())
        try:
            await rec.wait_for(lambda s: "default" in s.secrets, 10)
            first = rec.snapshots[-1]
            await rec.wait_for(lambda s: s.secrets["default"].chain_pem != first.secrets["default"].chain_pem, 10)
            return [first, rec.snapshots[-1], client.status()["types"]["SDS"]]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(0)

    first, rotated, sds = asyncio.run(scenario())
    assert first.listeners[0].tls.cert == "default" and rotated.listeners == first.listeners  # listener untouched
    for snap in (first, rotated):
        chain = load_certs(snap.secrets["default"].chain_pem, "chain")
        assert spiffe_ids(chain[0]) == ["spiffe://cluster.local/ns/default/sa/bench"]
    assert sds["nacks"] == 0 and sds["acks"] >= 2
