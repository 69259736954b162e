"""Our XdsClient over real gRPC on loopback: file changes, outages, unix and IPv6 targets, TLS. The stream logic
without gRPC (NACKs, reconnects, reconfigure): tests/unit/test_xds_client_stream.py on tests/support/ads.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import grpc
import pytest

from planemesh.xds.bootstrap import bootstrap_from_dict
from planemesh.xds.resources import CLUSTER
from planemesh.xds.server import ManagementServer
from planemesh.xds.transport import XdsClient
from tests.support.clusters import LOOPBACK_PLANES, cluster_doc
from tests.support.waiting import until
from tests.xds.xds_harness import write_resources

T = "type.googleapis.com/"
PLANES = LOOPBACK_PLANES


def make_client(address: str, mode: str = "sotw", applied: list | None = None) -> XdsClient:
    boot = bootstrap_from_dict(
        {
            "node": {"id": "n1"},
            "server": {"address": address, "mode": mode},
            "timing": {"backoff_base_s": 0.05, "backoff_max_s": 0.2},
            "planes": PLANES,
        }
    )

    async def apply(snapshot):
        if applied is not None:
            applied.append(snapshot)

    return XdsClient(boot, apply)


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_broken_file_is_reported_last_good_set_served_and_changes_pushed_within_a_second(tmp_path, mode):
    resdir = tmp_path / "res"
    resdir.mkdir()
    write_resources(resdir, "c.yaml", [cluster_doc("one")])

    async def scenario():
        server = ManagementServer(resdir)
        address = await server.start(f"unix://{tmp_path}/ads.sock")
        applied: list = []
        client = make_client(address, mode, applied)
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: applied and "one" in applied[-1].clusters, what="first snapshot")
            (resdir / "bad.yaml").write_text("- {'@type': nonsense\n")
            await until(lambda: server.load_error, what="the broken file to be reported")
            assert "bad.yaml" in server.load_error
            (resdir / "bad.yaml").unlink()
            started = time.monotonic()
            write_resources(resdir, "c.yaml", [cluster_doc("one"), cluster_doc("two")])
            await until(lambda: "two" in applied[-1].clusters, what="the change to reach the client")
            latency = time.monotonic() - started
            assert server.load_error is None
            return latency, applied, client
        finally:
            task.cancel()
            await server.stop()

    latency, applied, client = asyncio.run(scenario())
    print(f"{mode}: file change -> applied in {latency * 1000:.0f} ms")
    assert latency < 1.0, f"file change took {latency:.2f}s to be applied"
    assert all(set(s.clusters) <= {"one", "two"} for s in applied)  # nothing from the broken file leaked
    assert client.status()["types"]["CDS"]["nacks"] == 0


def test_losing_the_server_keeps_config_and_reconnect_resumes(tmp_path):
    resdir = tmp_path / "res"
    resdir.mkdir()
    write_resources(resdir, "c.yaml", [cluster_doc("one", address="::1")])

    async def scenario():
        server = ManagementServer(resdir)
        address = await server.start("[::1]:0")
        applied: list = []
        client = make_client(address, "delta", applied)
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: applied, what="first snapshot")
            await server.stop(0)
            await until(lambda: not client.state.connected, what="the client to notice")
            await asyncio.sleep(0.3)  # several backoff rounds without a server
            assert client.snapshot is applied[-1] and "one" in client.snapshot.clusters
            server2 = ManagementServer(resdir)
            await server2.start(address)
            try:
                await until(lambda: client.state.connected and server2.clients(), what="reconnect")
                cds = await until(lambda: server2.clients()[0].types.get("CDS"), what="the CDS subscription")
                await asyncio.sleep(0.3)
                # initial_resource_versions told the new server what we hold: nothing had to be resent.
                assert cds.subscribed == ("*",) and cds.sent_version == ""
                write_resources(resdir, "c.yaml", [cluster_doc("one", address="::1"), cluster_doc("two")])
                await until(lambda: "two" in applied[-1].clusters, what="an update on the new stream")
                # The ACK follows the apply and reaches the server's books asynchronously.
                await until(lambda: cds.acks == 1, what="the server to record the ACK")
                assert cds.acks == 1
            finally:
                await server2.stop(0)
            return client, applied
        finally:
            task.cancel()

    client, applied = asyncio.run(scenario())
    assert client.streams >= 2
    assert client.snapshot is applied[-1] and client.snapshot.clusters["one"].endpoints[0].address == "::1"


def test_xds_server_command_serves_the_examples_and_stats_feed_the_admin(tmp_path):
    from importlib import resources as importlib_resources

    from planemesh.agent.stats_report import coerce_report
    from tests.xds.xds_harness import ENVOY, free_port

    examples = importlib_resources.files("planemesh.xds").joinpath("examples")
    port = free_port()
    proc = subprocess.Popen(
        [str(ENVOY.parent / "planemesh"), "xds-server", "--resources", str(examples)],
        env={**os.environ, "PLANEMESH_XDS_LISTEN": f"127.0.0.1:{port}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    planes = [
        {"name": "oam", "id": 1, "interfaces": ["*-oam"], "cidrs": ["198.18.1.0/24", "fd00:18:1::/64"]},
        {
            "name": "media",
            "id": 2,
            "interfaces": ["*-media"],
            "cidrs": ["198.18.2.0/24"],
            "proxy_port": 15011,
            "sniff_port": 15012,
        },
    ]
    boot = bootstrap_from_dict(
        {
            "node": {"id": "cli"},
            "server": {"address": f"127.0.0.1:{port}"},
            "timing": {"backoff_base_s": 0.05, "backoff_max_s": 0.2},
            "planes": planes,
        }
    )
    applied: list = []

    async def apply(snapshot):
        applied.append(snapshot)

    async def scenario():
        client = XdsClient(boot, apply)
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: applied, timeout=10, what="the examples to be applied")
            return client
        finally:
            task.cancel()

    try:
        client = asyncio.run(scenario())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "ADS (SotW and Delta) on 127.0.0.1" in out
    assert {x.name for x in applied[-1].listeners} == {"oam_http", "media_db"}
    report = coerce_report(client.stats_report())
    assert report.xds_connected is True or report.xds_connected is False
    assert {r.type_url: (r.acks, r.resources) for r in report.xds}[CLUSTER] == (1, 3)


def _pki(tmp_path):
    """A throwaway CA and a server certificate for "xds.test" (cryptography, no network)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, issuer, key, signer, ca):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("planemesh test CA", "planemesh test CA", ca_key, ca_key, True)
    srv = cert("xds.test", "planemesh test CA", srv_key, ca_key, False)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    key_pem = srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), srv.public_bytes(pem), key_pem


def test_tls_to_the_management_server(tmp_path):
    resdir = tmp_path / "res"
    resdir.mkdir()
    write_resources(resdir, "c.yaml", [cluster_doc("secure")])
    _ca, srv_cert, srv_key = _pki(tmp_path)

    async def scenario():
        server = ManagementServer(resdir)
        address = await server.start("127.0.0.1:0", grpc.ssl_server_credentials([(srv_key, srv_cert)]))
        boot = bootstrap_from_dict(
            {
                "node": {"id": "tls"},
                "planes": PLANES,
                "timing": {"backoff_base_s": 0.05, "backoff_max_s": 0.2},
                "server": {"address": address, "tls": {"ca": str(tmp_path / "ca.pem"), "server_name": "xds.test"}},
            }
        )
        applied: list = []

        async def apply(snapshot):
            applied.append(snapshot)

        client = XdsClient(boot, apply)
        plain = make_client(address)  # the same server without TLS: refused, never configured
        tasks = [asyncio.create_task(client.run()), asyncio.create_task(plain.run())]
        try:
            await until(lambda: applied, what="a snapshot over TLS")
            await asyncio.sleep(0.3)
            return applied, plain
        finally:
            for t in tasks:
                t.cancel()
            await server.stop(0)

    applied, plain = asyncio.run(scenario())
    assert "secure" in applied[-1].clusters
    assert plain.snapshot is None and plain.last_error and plain.streams >= 1
