"""The agent's workload certificate by istio's CSR flow, in the real data path: `planemesh xds-server --ca
--ca-api csr` plays istiod (CreateCertificate only, no SDS `default`), the agent's bootstrap has `ca:` and a
token; the agent makes a key and CSR in memory, gets the certificate by CreateCertificate and terminates
mTLS with it on a port the eBPF interception sends to the plane's proxy. A client with a certificate from
the same CA is served; one from another CA and a plaintext one are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from planemesh.agent.identity.ca import key_pem, new_root, utcnow
from planemesh.agent.identity.ca_files import write_root_ca
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import eventually, running_agent
from tests.netns.test_mtls_lab import CLIENT, curl, listener

pytestmark = pytest.mark.netns


def test_agent_serves_mtls_with_a_certificate_from_create_certificate(run_prefix: str, tmp_path: Path) -> None:
    root = new_root("cluster.local", now=utcnow())
    ca_dir = tmp_path / "ca"
    write_root_ca(ca_dir, root)
    certs = tmp_path / "certs"
    certs.mkdir()
    for name, ca in (("amf", root), ("foreign", new_root("cluster.local", now=utcnow()))):
        issued = ca.issue(CLIENT, now=utcnow())
        (certs / f"{name}.pem").write_bytes(issued.cert_chain_pem())
        (certs / f"{name}.key").write_bytes(key_pem(issued.key))
    res = tmp_path / "resources"
    res.mkdir()
    (res / "lds.yaml").write_text(yaml.safe_dump([listener()]))
    (tmp_path / "token").write_text("lab-node-token\n")
    (tmp_path / "ca-tokens").write_text("lab-node-token lab/node-agent\n")
    sock = tmp_path / "xds.sock"
    boot = tmp_path / "bootstrap.yaml"
    boot.write_text(yaml.safe_dump({
        "node": {"id": "lab-node", "metadata": {"NAMESPACE": "lab", "SERVICE_ACCOUNT": "node-agent"}},
        "server": {"address": f"unix://{sock}", "token_file": str(tmp_path / "token")},
        "ca": {"ttl_s": 3600},
        "timing": {"backoff_base_s": 0.1, "backoff_max_s": 0.5},
        "planes": yaml.safe_load(default_config_text())["planes"]}))  # fmt: skip
    log = tmp_path / "xds-server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "planemesh.agent.cli", "xds-server", "--resources", str(res), "--listen",
             f"unix://{sock}", "--ca", str(ca_dir), "--ca-api", "csr", "--ca-tokens", str(tmp_path / "ca-tokens"),
             "--bearer-token-file", str(tmp_path / "token")], stdout=out, stderr=out)  # fmt: skip
    try:
        assert eventually(sock.exists, timeout=15), "xds-server did not start"
        with running_agent(f"{run_prefix}c", ["--bootstrap", str(boot)]) as env:
            url = f"https://{env.server('oam', 4)}:8443/mtls"
            ok = eventually(lambda: curl(env.client_ns, url, certs, "amf").stdout == "mtls ok 200", 20, 0.2)
            assert ok, (curl(env.client_ns, url, certs, "amf"), log.read_text()[-3000:])
            text = log.read_text()
            assert "CreateCertificate: signed spiffe://cluster.local/ns/lab/sa/node-agent" in text, text[-3000:]
            assert "issued spiffe" not in text  # no SDS issuing: the certificate came by the CSR flow
            target = f"{env.server('oam', 4)}:8443"
            served = subprocess.run(
                ["ip", "netns", "exec", env.client_ns, "openssl", "s_client", "-connect", target,
                 "-cert", certs / "amf.pem", "-key", certs / "amf.key"],
                input="", capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
            peer = subprocess.run(
                ["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=served.stdout,
                capture_output=True, text=True, check=False)  # fmt: skip
            assert "URI:spiffe://cluster.local/ns/lab/sa/node-agent" in peer.stdout, (served.stdout, peer)
            for who in ("foreign", None):
                refused = curl(env.client_ns, url, certs, who)
                assert " 200" not in refused.stdout, refused
            plain = curl(env.client_ns, url.replace("https", "http"), certs, None)
            assert " 200" not in plain.stdout, plain
            assert curl(env.client_ns, url, certs, "amf").stdout == "mtls ok 200"
            dump = env.admin.get("/config_dump").body.decode()
            assert "PRIVATE KEY" not in dump  # the key stays in the agent's memory
            assert env.agent.poll() is None
            written = [p for p in env.workdir.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
            assert written == [], written  # nor on disk
    finally:
        server.kill()
        server.wait()
