"""Connecting as istio-agent connects to istiod's 15012: TLS verified with istiod's root certificate and a
service-account JWT as `authorization: Bearer` call metadata, read from a file on every (re)connect.

Our ManagementServer plays istiod (TLS with a certificate from a throwaway CA, and the bearer check);
every address is loopback."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from planemesh.xds.bootstrap import bootstrap_from_dict
from planemesh.xds.server import ManagementServer
from planemesh.xds.transport import XdsClient
from tests.support.clusters import LOOPBACK_PLANES as PLANES
from tests.support.clusters import cluster_doc
from tests.support.waiting import until
from tests.xds.test_xds_transport import _pki
from tests.xds.xds_harness import write_resources

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDpzbGVlcCJ9.c2ln"


def _client(address: str, ca: str, token_file: str | None, applied: list) -> XdsClient:
    server = {"address": address, "tls": {"ca": ca, "server_name": "xds.test"}}
    if token_file is not None:
        server["token_file"] = token_file
    boot = bootstrap_from_dict(
        {
            "node": {"id": "sidecar~127.0.0.1~sleep.default~default.svc.cluster.local", "metadata": {"NAMESPACE": "x"}},
            "server": server,
            "planes": PLANES,
            "timing": {"backoff_base_s": 0.05, "backoff_max_s": 0.2},
        }
    )

    async def apply(snapshot):
        applied.append(snapshot)

    return XdsClient(boot, apply)


@pytest.fixture
def istiod(tmp_path):
    resdir = tmp_path / "res"
    resdir.mkdir()
    write_resources(resdir, "c.yaml", [cluster_doc("secure")])
    _ca, srv_cert, srv_key = _pki(tmp_path)
    (tmp_path / "token").write_text(TOKEN + "\n")
    other = tmp_path / "other"
    other.mkdir()
    _pki(other)  # another CA: it did not sign the server's certificate
    return {
        "resdir": resdir,
        "creds": grpc.ssl_server_credentials([(srv_key, srv_cert)]),
        "ca": str(tmp_path / "ca.pem"),
        "wrong_ca": str(other / "ca.pem"),
        "token": tmp_path / "token",
    }


def _scenario(istiod, clients_of, settle_s: float = 0.6):
    async def run():
        server = ManagementServer(istiod["resdir"], bearer_token=TOKEN)
        address = await server.start("127.0.0.1:0", istiod["creds"])
        clients = clients_of(address)
        tasks = [asyncio.create_task(c.run()) for c, _ in clients]
        try:
            await until(lambda: clients[0][1], what="the good client to be configured")
            await asyncio.sleep(settle_s)  # the others had several attempts
            return [c for c, _ in clients], server
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.stop(0)

    return asyncio.run(run())


def test_right_ca_and_token_connect_wrong_ones_fail_clearly(istiod, tmp_path):
    lists: list[list] = [[], [], [], [], []]

    def clients(address):
        token = str(istiod["token"])
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-token")
        return [
            (_client(address, istiod["ca"], token, lists[0]), lists[0]),
            (_client(address, istiod["wrong_ca"], token, lists[1]), lists[1]),
            (_client(address, istiod["ca"], None, lists[2]), lists[2]),
            (_client(address, istiod["ca"], str(wrong), lists[3]), lists[3]),
            (_client(address, istiod["ca"], str(tmp_path / "absent-token"), lists[4]), lists[4]),
        ]

    (good, wrong_ca, no_token, wrong_token, absent), server = _scenario(istiod, clients)
    assert "secure" in good.snapshot.clusters and good.status()["types"]["CDS"]["acks"] >= 1
    assert [c.snapshot for c in (wrong_ca, no_token, wrong_token, absent)] == [None] * 4
    assert "UNAVAILABLE" in wrong_ca.last_error and "server.tls.ca" in wrong_ca.last_error
    assert "UNAUTHENTICATED" in no_token.last_error and "no authorization metadata" in no_token.last_error
    assert "set server.token_file" in no_token.last_error
    assert "UNAUTHENTICATED" in wrong_token.last_error and "wrong bearer token" in wrong_token.last_error
    assert "server.token_file" in absent.last_error and "cannot read" in absent.last_error
    assert absent.streams == 0  # never opened a stream without its token, and kept retrying (not crashed)
    # only the authenticated client ever reached the ADS logic
    assert {c.node_id for c in server.clients()} == {"sidecar~127.0.0.1~sleep.default~default.svc.cluster.local"}


def test_the_token_is_read_again_on_reconnect(istiod):
    """Kubernetes rotates projected tokens: a reconnect must send the file's current content."""
    applied: list = []
    new_token = TOKEN + "x"

    async def run():
        server = ManagementServer(istiod["resdir"], bearer_token=TOKEN)
        address = await server.start("127.0.0.1:0", istiod["creds"])
        client = _client(address, istiod["ca"], str(istiod["token"]), applied)
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: applied, what="first snapshot")
            await server.stop(0)
            istiod["token"].write_text(new_token)
            server2 = ManagementServer(istiod["resdir"], bearer_token=new_token)
            await server2.start(address, istiod["creds"])
            try:
                await until(lambda: server2.clients() and client.state.connected, 10, "reconnect with the new token")
                await until(lambda: server2.clients()[0].types.get("CDS"), what="CDS on the new stream")
            finally:
                await server2.stop(0)
            return client
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    client = asyncio.run(run())
    assert client.streams >= 2


def _xds_server_command(istiod, tmp_path, auth_args, tokens, served_what, refused_code, refused_what):
    """Runs `planemesh xds-server --tls-cert --tls-key <auth_args>` and two clients (token files `tokens`, None:
    no token) until the first is served and the second refused with `refused_code`. Returns (the command's
    exit code, its output, the snapshots each client applied, the refused client)."""
    import os
    import signal
    import subprocess

    from tests.xds.xds_harness import ENVOY, free_port

    cert, key = tmp_path / "srv.pem", tmp_path / "srv.key"
    _ca, srv_cert, srv_key = _pki(tmp_path)
    cert.write_bytes(srv_cert)
    key.write_bytes(srv_key)
    port = free_port()
    cmd = [str(ENVOY.parent / "planemesh"), "xds-server", "--resources", str(istiod["resdir"])]
    cmd += ["--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert), "--tls-key", str(key), *auth_args]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    applied: tuple[list, list] = ([], [])

    async def run():
        clients = [
            _client(f"127.0.0.1:{port}", str(tmp_path / "ca.pem"), t, a) for t, a in zip(tokens, applied, strict=True)
        ]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        try:
            await until(lambda: applied[0], 15, served_what)
            await until(lambda: refused_code in (clients[1].last_error or ""), 5, refused_what)
            return clients
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        _served, refused = asyncio.run(run())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    return proc.returncode, out, applied, refused


def test_the_xds_server_command_serves_tls_with_a_bearer_token(istiod, tmp_path):
    """`planemesh xds-server --tls-cert --tls-key --bearer-token-file`: a stand-in for istiod's 15012."""
    returncode, out, (good, anonymous), anon = _xds_server_command(
        istiod,
        tmp_path,
        ["--bearer-token-file", str(istiod["token"])],
        (str(istiod["token"]), None),
        "the command to serve over TLS",
        "UNAUTHENTICATED",
        "the anonymous refused",
    )
    assert returncode == 0, out
    assert "with TLS requiring a bearer token" in out
    assert "secure" in good[-1].clusters and not anonymous
    assert "UNAUTHENTICATED" in anon.last_error


def test_the_xds_server_command_authorizes_streams_by_token_identity(istiod, tmp_path):
    """`planemesh xds-server --tls-cert --tls-key --xds-tokens`: istiod's 15012 authorization. The client's node
    (NAMESPACE `x` in `_client`) is served with x's token and refused (PERMISSION_DENIED) with another's."""
    (tmp_path / "mine").write_text("token-of-x\n")
    (tmp_path / "theirs").write_text("token-of-y\n")
    tokens = tmp_path / "xds-tokens"
    tokens.write_text("# token identity\ntoken-of-x x/default\ntoken-of-y y/default\n")
    returncode, out, (mine, theirs), other = _xds_server_command(
        istiod,
        tmp_path,
        ["--xds-tokens", str(tokens)],
        (str(tmp_path / "mine"), str(tmp_path / "theirs")),
        "the command to serve the node its own token names",
        "PERMISSION_DENIED",
        "another identity refused",
    )
    assert returncode == 0, out
    assert "secure" in mine[-1].clusters and not theirs
    assert "authorization failed: no identities ([y/default]) matched x/" in other.last_error


def test_xds_tokens_file_errors_name_the_line(tmp_path):
    from planemesh.model.config import ConfigError
    from planemesh.xds.server_auth import read_identity_tokens

    path = tmp_path / "t"
    path.write_text("a ns/sa\nb *\n")
    assert read_identity_tokens(path) == {"a": ("ns", "sa"), "b": None}
    for text, where in [("a ns\n", ":1"), ("a ns/sa extra\n", ":1"), ("a ns/sa\nb /sa\n", ":2"), ("# none\n", "t")]:
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            read_identity_tokens(path)
        assert info.value.path.endswith(where)
