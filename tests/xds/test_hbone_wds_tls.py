"""The HBONE node's WDS stream reaches its server as the agent's ADS stream does (xds/server_channel.py): TLS
verified with the server's CA and a bearer token read from a file, as ztunnel reaches istiod's 15012. Our
ManagementServer plays istiod (a throwaway CA, the bearer check) on loopback."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from pathlib import Path

import grpc
import pytest
import yaml

from planemesh.agent.hbone.routes import Peer, Routes
from planemesh.agent.hbone.section import check
from planemesh.agent.hbone.settings import Wds
from planemesh.agent.hbone.supervisor import load_hbone
from planemesh.agent.hbone.wds import Table, WdsState
from planemesh.agent.hbone.wds_client import WdsClient
from planemesh.xds.server import ManagementServer
from planemesh.xds.server_channel import TlsFiles
from tests.xds.test_xds_istiod_connect import TOKEN
from tests.xds.test_xds_transport import _pki

ADDRESS = "type.googleapis.com/istio.workload.Address"
POD_B = "10.81.2.2"


@pytest.fixture
def istiod(tmp_path: Path) -> dict:
    res = tmp_path / "res"
    res.mkdir()
    raw = base64.b64encode(ipaddress.ip_address(POD_B).packed).decode()
    workload = {"uid": "c1/pod-b", "namespace": "ran", "serviceAccount": "smf", "node": "node-b",
                "addresses": [raw], "tunnelProtocol": "HBONE"}  # fmt: skip
    pod_b = {"@type": ADDRESS, "workload": workload}
    (res / "wds.yaml").write_text(yaml.safe_dump([pod_b]))
    _ca, cert, key = _pki(tmp_path)
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "wrong").write_text("not-the-token\n")
    return {"res": res, "creds": grpc.ssl_server_credentials([(key, cert)]), "dir": tmp_path}


def _tables(istiod: dict, token: str | None, wait_s: float, wds_of=None) -> tuple[list[Table], WdsClient]:
    """`wds_of(address)`: the Wds settings to use (default: the server's CA and `token`)."""

    async def run() -> tuple[list[Table], WdsClient]:
        server = ManagementServer(istiod["res"], bearer_token=TOKEN)
        address = await server.start("127.0.0.1:0", istiod["creds"])
        tls = TlsFiles(str(istiod["dir"] / "ca.pem"), server_name="xds.test")
        wds = Wds(address, "node-a", tls, str(istiod["dir"] / token) if token else None)
        wds = wds_of(address) if wds_of is not None else wds
        static = Routes({}, (Peer("node-b", ("10.81.0.2", 15008), ()),))
        tables: list[Table] = []
        client = WdsClient(wds, WdsState("planemesh-hbone~node-a", "node-a", static), tables.append)
        task = asyncio.create_task(client.run())
        try:
            await asyncio.wait_for(client.received.wait(), wait_s)
        except TimeoutError:
            pass
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(0)
        return tables, client

    return asyncio.run(run())


def test_wds_over_tls_with_the_token_gets_the_table(istiod: dict) -> None:
    tables, client = _tables(istiod, "token", 15)
    assert client.received.is_set()
    peers = {p.name: p.cidrs for p in tables[-1].routes.peers}
    assert any(POD_B in str(c) for c in peers["node-b"]), peers  # pod B's /32 via node B, learned over TLS


def test_wds_with_a_wrong_or_no_token_gets_nothing(istiod: dict, caplog: pytest.LogCaptureFixture) -> None:
    for token in ("wrong", None):
        caplog.clear()
        tables, client = _tables(istiod, token, 1.5)
        assert not tables and not client.received.is_set()
        assert "UNAUTHENTICATED" in caplog.text, caplog.text


def _bootstrap_wds(istiod: dict, address: str, **wds: object) -> Wds:
    """The WDS settings the agent gives its HBONE node from a bootstrap: istiod's 15012 in `server:` (its CA,
    the token file), an `hbone.wds` that names only the address and node (plus `wds` overrides)."""
    d = istiod["dir"]
    boot = {"node": {"id": "n", "metadata": {"NAMESPACE": "planemesh", "SERVICE_ACCOUNT": "node-a"}},
            "server": {"address": address, "tls": {"ca": str(d / "ca.pem"), "server_name": "xds.test"},
                       "token_file": str(d / "token")},
            "planes": [{"name": "oam", "id": 1, "interfaces": ["*-oam"], "cidrs": ["198.18.1.0/24"]}],
            "ca": {},  # certificates by CreateCertificate from the same server (the section's ca_api)
            "hbone": {"node": {"identity": "spiffe://cluster.local/ns/planemesh/sa/node-a"},
                      "peers": [{"name": "node-b", "address": "10.81.0.2"}],
                      "wds": {"address": address, "node": "node-a", **wds}}}  # fmt: skip
    path = d / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(boot))
    settings = load_hbone(None, path)
    assert settings is not None
    wds_settings = check(settings).wds
    assert wds_settings is not None
    return wds_settings


def test_wds_takes_the_bootstraps_tls_and_token_when_it_sets_none(istiod: dict) -> None:
    """Before, a `wds:` without `tls`/`token_file` went plaintext and tokenless to istiod's 15012: refused."""
    tables, client = _tables(istiod, None, 15, lambda address: _bootstrap_wds(istiod, address))
    assert client.received.is_set() and client.wds.tls is not None and client.wds.token_file is not None
    peers = {p.name: p.cidrs for p in tables[-1].routes.peers}
    assert any(POD_B in str(c) for c in peers["node-b"]), peers


def test_wds_own_settings_win_over_the_bootstraps(istiod: dict, caplog: pytest.LogCaptureFixture) -> None:
    wrong = str(istiod["dir"] / "wrong")
    tables, client = _tables(istiod, None, 1.5, lambda address: _bootstrap_wds(istiod, address, token_file=wrong))
    assert client.wds.token_file == wrong and client.wds.tls is not None  # its own token, the bootstrap's CA
    assert not tables and "UNAUTHENTICATED" in caplog.text, caplog.text
    plain = _bootstrap_wds(istiod, "127.0.0.1:1", tls=None, token_file=None)  # null: plaintext, no token
    assert plain.tls is None and plain.token_file is None
