"""Istio's inbound mTLS on an auto-protocol (sniffed) port in the real data path: the eBPF program sends the
port to the plane's sniffing listener, which terminates mTLS for a client offering istio's ALPN (certificates
from the built-in CA over SDS, `planemesh xds-server --ca`) and sniffs inside: HTTP is answered by the TLS
chain's routes with the client's identity in the access log, raw TCP is relayed decrypted to the server pod;
plaintext HTTP and TCP keep their plaintext chains."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from planemesh.agent.demo import UNDECLARED_TCP_PORT
from planemesh.agent.identity.ca import key_pem, new_root, utcnow
from planemesh.agent.identity.ca_files import write_root_ca
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import eventually, running_agent
from tests.support.procs import dev_module_argv

pytestmark = pytest.mark.netns
T = "type.googleapis.com/"
SDS = {"ads": {}, "resource_api_version": "V3"}
CLIENT = parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/amf")
PORT = UNDECLARED_TCP_PORT  # the lab's TCP server (says "peer <address>", then echoes) listens here
TLS = {"name": "tls", "typed_config": {
    "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
    "require_client_certificate": True,
    "common_tls_context": {
        "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": SDS}],
        "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": SDS}}}}  # fmt: skip


def _hcm(body: str) -> dict:
    return {"name": "hcm", "typed_config": {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": body,
        "route_config": {"name": body, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": body}}}]}]},
        "http_filters": [{"name": "router", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}]}}  # fmt: skip


TCP = {"name": "tcp", "typed_config": {"@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                       "stat_prefix": "pass", "cluster": "PassthroughCluster"}}  # fmt: skip


def resources() -> list[dict]:
    """virtualInbound's auto-protocol port as istiod builds it (PERMISSIVE), as one listener."""
    chains = [
        {"filter_chain_match": {"transport_protocol": "tls",
                                "application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"]},
         "transport_socket": TLS, "filters": [_hcm("mtls-http")]},
        {"filter_chain_match": {"transport_protocol": "tls", "application_protocols": ["istio-peer-exchange", "istio"]},
         "transport_socket": TLS, "filters": [TCP]},
        {"filter_chain_match": {"transport_protocol": "raw_buffer",
                                "application_protocols": ["http/1.1", "http/1.0", "h2c"]},
         "filters": [_hcm("plain-http")]},
        {"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": [TCP]},
    ]  # fmt: skip
    listener = {"@type": T + "envoy.config.listener.v3.Listener", "name": f"0.0.0.0_{PORT}",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": PORT}}, "filter_chains": chains}
    passthrough = {"@type": T + "envoy.config.cluster.v3.Cluster", "name": "PassthroughCluster",
                   "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s"}
    return [listener, passthrough]


def client(ns: str, host: str, certs: Path, who: str | None, alpn: str, payload: str, port: int = PORT) -> bytes:
    cert, key = (str(certs / f"{who}.pem"), str(certs / f"{who}.key")) if who else ("", "")
    argv = dev_module_argv("tests.netns.sniff_mtls_client", host, str(port), cert, key, alpn, payload)
    out = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=30, check=False)
    return ast.literal_eval(out.stdout.strip()) if out.stdout.strip() else b""


def test_mtls_on_a_sniffed_port_is_terminated_and_sniffed_inside(run_prefix: str, tmp_path: Path) -> None:
    root = new_root("cluster.local", now=utcnow())
    ca_dir = tmp_path / "ca"
    write_root_ca(ca_dir, root)
    certs = tmp_path / "certs"
    certs.mkdir()
    issued = root.issue(CLIENT, now=utcnow())
    (certs / "amf.pem").write_bytes(issued.cert_chain_pem())
    (certs / "amf.key").write_bytes(key_pem(issued.key))
    res = tmp_path / "resources"
    res.mkdir()
    (res / "resources.yaml").write_text(yaml.safe_dump(resources()))
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
        with running_agent(f"{run_prefix}s", ["--bootstrap", str(boot)]) as env:
            host, ns = env.server("oam", 4), env.client_ns
            get = "GET / HTTP/1.1\\r\\nHost: app\\r\\nConnection: close\\r\\n\\r\\n"

            def mtls_http() -> bytes:
                return client(ns, host, certs, "amf", "istio-http/1.1", get)

            assert eventually(lambda: mtls_http().endswith(b"mtls-http"), 20, 0.3), mtls_http()
            assert eventually(lambda: f'"{CLIENT}"' in env.access_log(), 5), env.access_log()[-2000:]
            tcp = client(ns, host, certs, "amf", "istio-peer-exchange,istio", "ping\\n")
            assert tcp.startswith(b"peer ") and tcp.endswith(b"ping\n"), tcp  # decrypted to the server pod
            assert client(ns, host, certs, None, "", get).endswith(b"plain-http")  # plaintext twin
            plain_tcp = client(ns, host, certs, None, "", "hello\\n")
            assert plain_tcp.startswith(b"peer ") and plain_tcp.endswith(b"hello\n"), plain_tcp
            assert env.agent.poll() is None
    finally:
        server.kill()
        server.wait()
