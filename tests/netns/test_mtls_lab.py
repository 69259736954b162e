"""mTLS in the real data path: the agent, driven by `planemesh xds-server --ca`, gets its certificate over SDS
and terminates mTLS on a declared port that the eBPF interception sends to the plane's proxy; a client pod
with a certificate from the same CA is served and named in the access log; a client from another CA, and a
plaintext client, are refused; the agent keeps serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from planemesh.agent.identity.ca import key_pem, new_root, utcnow
from planemesh.agent.identity.ca_files import write_root_ca
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import eventually, running_agent

pytestmark = pytest.mark.netns
T = "type.googleapis.com/"
SDS = {"ads": {}, "resource_api_version": "V3"}
CLIENT = parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/amf")


def listener() -> dict:
    return {
        "@type": T + "envoy.config.listener.v3.Listener",
        "name": "mtls",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8443}},
        "filter_chains": [{
            "transport_socket": {"name": "tls", "typed_config": {
                "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": SDS}],
                    "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": SDS}}}},
            "filters": [{"name": "hcm", "typed_config": {
                "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "mtls",
                "route_config": {"name": "mtls", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"},
                     "direct_response": {"status": 200, "body": {"inline_string": "mtls ok"}}}]}]},
                "http_filters": [{"name": "router", "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}]}}],
        }],
    }  # fmt: skip


def curl(ns: str, url: str, certs: Path, who: str | None) -> subprocess.CompletedProcess:
    auth = ["--cert", certs / f"{who}.pem", "--key", certs / f"{who}.key"] if who else []
    return subprocess.run(
        ["ip", "netns", "exec", ns, "curl", "-sS", "-k", "--max-time", "5", *auth, url, "-w", " %{http_code}"],
        capture_output=True, text=True, check=False)  # fmt: skip


def test_agent_terminates_mtls_with_sds_certificates_in_the_data_path(run_prefix: str, tmp_path: Path) -> None:
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
    sock = tmp_path / "xds.sock"
    boot = tmp_path / "bootstrap.yaml"
    boot.write_text(yaml.safe_dump({
        "node": {"id": "lab-node"}, "server": {"address": f"unix://{sock}"},
        "timing": {"backoff_base_s": 0.1, "backoff_max_s": 0.5},
        "planes": yaml.safe_load(default_config_text())["planes"]}))  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "planemesh.agent.cli", "xds-server", "--resources", str(res), "--listen",
         f"unix://{sock}", "--ca", str(ca_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert eventually(sock.exists, timeout=15), "xds-server did not start"
        with running_agent(f"{run_prefix}m", ["--bootstrap", str(boot)]) as env:
            url = f"https://{env.server('oam', 4)}:8443/mtls"
            ok = eventually(lambda: curl(env.client_ns, url, certs, "amf").stdout == "mtls ok 200", 15, 0.2)
            assert ok, curl(env.client_ns, url, certs, "amf")
            assert eventually(lambda: f'"{CLIENT}"' in env.access_log(), 5), env.access_log()[-2000:]
            for who in ("foreign", None):
                refused = curl(env.client_ns, url, certs, who)
                assert " 200" not in refused.stdout, refused
            plain = curl(env.client_ns, url.replace("https", "http"), certs, None)
            assert " 200" not in plain.stdout, plain
            assert curl(env.client_ns, url, certs, "amf").stdout == "mtls ok 200"

            def tls_row() -> dict:
                _, stats = env.admin.get_json("/stats?format=json")
                rows = [r for r in stats.get("tls", []) if r["plane"] == "oam"]
                row = rows[0] if rows else {}
                return row if row.get("plaintext_refused", 0) >= 1 and row.get("handshake_failed", 0) >= 2 else {}

            row = eventually(tls_row, 10, 0.3)  # the workers' counters reach the agent's /stats
            assert row and row["handshakes"] >= 2, row
            prom = env.admin.get("/stats").body.decode()
            assert 'planemesh_tls_refused_total{plane="oam",reason="plaintext"} 1.0' in prom, prom[-3000:]
            dump = env.admin.get("/config_dump").body.decode()
            assert "BEGIN CERTIFICATE" in dump and "PRIVATE KEY" not in dump  # keys never leave the agent
            assert env.agent.poll() is None
    finally:
        server.kill()
        server.wait()
