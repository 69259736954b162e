"""istio's CreateCertificate over real gRPC on loopback: our ManagementServer plays istiod's CA (TLS with a
server certificate from a throwaway CA, bearer tokens), our client plays istio-agent (CSR in memory, the
root certificate for TLS, the token as `authorization: Bearer`), and the xDS client uses the certificate
for the `default`/`ROOTCA` Secrets of a TLS listener and re-applies it when it rotates."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest
import yaml

from planemesh.agent.identity.ca import load_certs, new_root, spiffe_ids, utcnow
from planemesh.agent.identity.ca_service import CsrSigner
from planemesh.agent.identity.cert_client import CaSettings, CertificateClient, FetchError, create_certificate
from planemesh.agent.identity.istio_ca_proto import METHOD, IstioCertificateRequest, IstioCertificateResponse
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.agent.stats_report import StatsRegistry
from planemesh.model.static_config import default_config_text
from planemesh.xds.bootstrap import bootstrap_from_dict
from planemesh.xds.resources import LISTENER
from planemesh.xds.server import ManagementServer
from planemesh.xds.transport import XdsClient
from tests.unit.test_ops_metrics import _scrape
from tests.xds.test_xds_transport import _pki

AMF = parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/amf")


@pytest.fixture
def pki(tmp_path):
    _ca, srv_cert, srv_key = _pki(tmp_path)
    (tmp_path / "token").write_text("tok-amf\n")
    (tmp_path / "bad-token").write_text("tok-nobody\n")
    return {
        "creds": grpc.ssl_server_credentials([(srv_key, srv_cert)]),
        "root": str(tmp_path / "ca.pem"),
        "token": str(tmp_path / "token"),
        "bad_token": str(tmp_path / "bad-token"),
    }


def _server(ca) -> ManagementServer:
    return ManagementServer(None, csr_signer=CsrSigner(ca, {"tok-amf": AMF}, ttl_s=3600))


def test_agent_gets_its_certificate_over_tls_with_its_token(pki) -> None:
    ca = new_root("cluster.local", now=utcnow() - dt.timedelta(minutes=5))

    async def scenario():
        server = _server(ca)
        address = await server.start("127.0.0.1:0", pki["creds"])
        settings = CaSettings(address, root_cert=pki["root"], server_name="xds.test", token_file=pki["token"])
        try:
            cert = await create_certificate(settings, AMF, utcnow())
            errors = []
            for bad in (
                CaSettings(address, root_cert=pki["root"], server_name="xds.test", token_file=pki["bad_token"]),
                CaSettings(address, root_cert=pki["root"], server_name="xds.test"),  # no token
            ):
                with pytest.raises(FetchError) as err:
                    await create_certificate(bad, AMF, utcnow())
                errors.append(str(err.value))
            with pytest.raises(FetchError, match="PERMISSION_DENIED") as err:  # the token is amf's, not smf's
                await create_certificate(settings, parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/smf"), utcnow())
            errors.append(str(err.value))
            async with grpc.aio.secure_channel(
                address,
                grpc.ssl_channel_credentials(open(pki["root"], "rb").read()),
                options=[("grpc.ssl_target_name_override", "xds.test")],
            ) as channel:
                call = channel.unary_unary(
                    METHOD,
                    request_serializer=IstioCertificateRequest.SerializeToString,
                    response_deserializer=IstioCertificateResponse.FromString,
                )
                with pytest.raises(grpc.aio.AioRpcError) as raw:
                    auth = (("authorization", "Bearer tok-amf"),)
                    await call(IstioCertificateRequest(csr="not a csr"), metadata=auth)
                errors.append(f"{raw.value.code().name}: {raw.value.details()}")
            return cert, errors, server.csr_signer
        finally:
            await server.stop(0)

    cert, errors, signer = asyncio.run(scenario())
    assert spiffe_ids(cert.leaf) == [str(AMF)] and cert.roots == (ca.cert,)
    assert errors[0] == "CreateCertificate: UNAUTHENTICATED: unknown bearer token", errors
    assert errors[1].startswith("CreateCertificate: UNAUTHENTICATED: no `authorization"), errors
    assert "may ask for spiffe://cluster.local/ns/ran/sa/amf" in errors[2], errors
    assert errors[3].startswith("INVALID_ARGUMENT: CSR: not a PEM certificate request"), errors
    assert signer.signed == 1
    assert signer.refused == {"UNAUTHENTICATED": 2, "PERMISSION_DENIED": 1, "INVALID_ARGUMENT": 1}


def test_xds_client_uses_the_csr_certificate_and_reapplies_the_rotation(pki) -> None:
    from tests.unit.test_xds_sds_client import _listener_msg

    ca = new_root("cluster.local", now=utcnow() - dt.timedelta(minutes=5))

    async def scenario():
        server = _server(ca)
        server.set_resources(LISTENER, [_listener_msg()])  # a TLS listener naming `default` and `ROOTCA`
        address = await server.start("127.0.0.1:0", pki["creds"])
        boot = bootstrap_from_dict(
            {
                "node": {"id": "amf-1", "metadata": {"NAMESPACE": "ran", "SERVICE_ACCOUNT": "amf"}},
                "server": {
                    "address": address,
                    "tls": {"ca": pki["root"], "server_name": "xds.test"},
                    "token_file": pki["token"],
                },
                "ca": {"ttl_s": 3600},
                "planes": yaml.safe_load(default_config_text())["planes"],  # the listener's plane
                "timing": {"backoff_base_s": 0.05, "backoff_max_s": 0.2, "initial_fetch_timeout_s": 10},
            }
        )
        snapshots: list = []
        changed = asyncio.Event()

        async def apply(snapshot):
            snapshots.append(snapshot)
            changed.set()

        async def until(predicate):
            while not (snapshots and predicate(snapshots[-1])):
                changed.clear()
                await asyncio.wait_for(changed.wait(), 15)

        client = XdsClient(boot, apply)
        task = asyncio.create_task(client.run())
        try:
            await until(lambda s: "default" in s.secrets)
            first = snapshots[-1]
            client.certificates.renew_now()  # as at half-life: a new key and certificate, the listener's secret changes
            await until(lambda s: s.secrets["default"].chain_pem != first.secrets["default"].chain_pem)
            registry = StatsRegistry()
            registry.register("xds", client.stats_report)
            return first, snapshots[-1], client.status(), _scrape(registry)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(0)

    first, rotated, status, samples = asyncio.run(scenario())
    labels = (("identity", str(AMF)),)
    assert samples[("planemesh_workload_certificate_fetches_total", labels)] >= 2
    assert samples[("planemesh_workload_certificate_failures_total", labels)] == 0
    expiry = samples[("planemesh_workload_certificate_expiry_timestamp_seconds", labels)]
    assert expiry == rotated_not_after(rotated)
    assert first.listeners[0].tls.cert == "default"  # the listener terminates TLS with the CSR certificate
    for snap in (first, rotated):
        leaf = load_certs(snap.secrets["default"].chain_pem, "chain")[0]
        assert spiffe_ids(leaf) == [str(AMF)]
    assert status["certificate"]["fetched"] >= 2 and status["certificate"]["identity"] == str(AMF)
    assert status["certificate"]["last_error"] is None


def rotated_not_after(snapshot) -> float:
    return load_certs(snapshot.secrets["default"].chain_pem, "chain")[0].not_valid_after_utc.timestamp()


def test_certificate_client_renews_at_half_life(pki) -> None:
    ca = new_root("cluster.local", now=utcnow() - dt.timedelta(minutes=5))

    async def scenario():
        server = _server(ca)
        address = await server.start("127.0.0.1:0", pki["creds"])
        # 66 s asked + 60 s backdating: half-life 3 s from now
        settings = CaSettings(address, root_cert=pki["root"], server_name="xds.test", token_file=pki["token"], ttl_s=66)
        got: list = []

        async def on_change(cert):
            got.append(cert)

        client = CertificateClient(settings, AMF, on_change)
        task = asyncio.create_task(client.run())
        try:
            for _ in range(150):
                if len(got) >= 2:
                    break
                await asyncio.sleep(0.1)
            return got
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(0)

    got = asyncio.run(scenario())
    assert len(got) == 2, got  # one renewal in ~3 s, not a loop
    first, second = got
    assert second.leaf.not_valid_before_utc >= first.rotate_at - dt.timedelta(seconds=61)
    assert first.key.public_key().public_numbers() != second.key.public_key().public_numbers()  # a new key each time


def test_certificate_client_retries_and_keeps_reporting(pki) -> None:
    async def scenario():
        settings = CaSettings("127.0.0.1:1", token_file=pki["bad_token"])  # nothing listens on port 1

        async def never(cert):
            raise AssertionError("no certificate expected")

        client = CertificateClient(settings, AMF, never)
        task = asyncio.create_task(client.run())
        try:
            for _ in range(100):
                if client.failures >= 2:
                    break
                await asyncio.sleep(0.1)
            return client.status()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    status = asyncio.run(scenario())
    assert status["failures"] >= 2 and status["last_error"].startswith("CreateCertificate: UNAVAILABLE"), status
    assert status["not_after"] is None
