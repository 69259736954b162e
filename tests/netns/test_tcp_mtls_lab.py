"""TCP over mTLS with network RBAC in the real data path: an xDS tcp_proxy chain on plane oam terminates mTLS
(inline certificates from the built-in CA) and carries envoy.filters.network.rbac allowing one SPIFFE ID; the
eBPF interception sends the chain's connections to the plane's sniffing listener instead of the kernel bypass,
which terminates TLS, authorizes and relays the plaintext bytes to the original destination (the lab's HTTP
server). The allowed identity gets the server's answer; another identity of the same CA, another CA and a
plaintext client are refused, counted, and the agent keeps serving."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from planemesh.agent.demo import BYPASS_HTTP_PORT
from planemesh.agent.identity.ca import key_pem, new_root, utcnow
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import eventually, running_agent

pytestmark = pytest.mark.netns
T = "type.googleapis.com/envoy."
AMF = "spiffe://cluster.local/ns/ran/sa/amf"
PORT = BYPASS_HTTP_PORT  # the lab's HTTP server; declared here as a TCP service behind mTLS


def resources(root, server) -> list[dict[str, Any]]:
    inline = {"certificate_chain": {"inline_bytes": _b64(server.cert_chain_pem())},
              "private_key": {"inline_bytes": _b64(server.key_pem())}}  # fmt: skip
    trusted = {"trusted_ca": {"inline_bytes": _b64(root.root_pem())}}
    rbac = {"stat_prefix": "tcp.", "rules": {"action": "ALLOW", "policies": {"amf-only": {
        "permissions": [{"destination_port": PORT}],
        "principals": [{"authenticated": {"principal_name": {"exact": AMF}}}]}}}}  # fmt: skip
    return [
        {"@type": T + "config.listener.v3.Listener", "name": "db",
         "address": {"socket_address": {"address": "0.0.0.0", "port_value": PORT}},
         "metadata": {"filter_metadata": {"planemesh": {"plane": "oam"}}},
         "filter_chains": [{
             "transport_socket": {"name": "tls", "typed_config": {
                 "@type": T + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                 "require_client_certificate": True,
                 "common_tls_context": {"tls_certificates": [inline], "validation_context": trusted}}},
             "filters": [
                 {"name": "envoy.filters.network.rbac", "typed_config": {
                     "@type": T + "extensions.filters.network.rbac.v3.RBAC", **rbac}},
                 {"name": "tcp", "typed_config": {"@type": T + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                                  "stat_prefix": "db", "cluster": "passthrough"}}]}]},
        {"@type": T + "config.cluster.v3.Cluster", "name": "passthrough", "type": "ORIGINAL_DST",
         "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s"},
    ]  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_tcp_mtls_chain_terminates_authorizes_and_relays(run_prefix: str, tmp_path: Path) -> None:
    root = new_root("cluster.local", now=utcnow())
    server = root.issue(parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/db"), now=utcnow())
    certs = tmp_path / "certs"
    certs.mkdir()
    for name, ca, who in (("amf", root, AMF), ("smf", root, "spiffe://cluster.local/ns/ran/sa/smf"),
                          ("foreign", new_root("cluster.local", now=utcnow()), AMF)):  # fmt: skip
        issued = ca.issue(parse_spiffe_id(who), now=utcnow())
        (certs / f"{name}.pem").write_bytes(issued.cert_chain_pem())
        (certs / f"{name}.key").write_bytes(key_pem(issued.key))
    planes = yaml.safe_load(default_config_text())
    planes.pop("listeners")  # listeners come over xDS
    (tmp_path / "planes.yaml").write_text(yaml.safe_dump(planes))
    (tmp_path / "xds").mkdir()
    (tmp_path / "xds" / "resources.yaml").write_text(yaml.safe_dump(resources(root, server)))
    args = ["--config", str(tmp_path / "planes.yaml"), "--xds-resources", str(tmp_path / "xds")]
    with running_agent(f"{run_prefix}t", args) as env:
        url = f"https://{env.server('oam', 4)}:{PORT}/over-mtls"

        def curl(who: str | None, target: str = url) -> subprocess.CompletedProcess:
            auth = ["--cert", certs / f"{who}.pem", "--key", certs / f"{who}.key"] if who else []
            return subprocess.run(
                ["ip", "netns", "exec", env.client_ns, "curl", "-sS", "-k", "--max-time", "5", *auth, target,
                 "-o", "/dev/null", "-w", "%{http_code}"], capture_output=True, text=True, check=False)  # fmt: skip

        assert eventually(lambda: curl("amf").stdout == "200", 20, 0.3), curl("amf")
        for who in ("smf", "foreign"):
            refused = curl(who)
            assert refused.stdout != "200", (who, refused)
        plain = curl(None, url.replace("https", "http"))
        assert plain.stdout != "200", plain
        assert curl("amf").stdout == "200"  # others unaffected

        def tls_row() -> dict:
            _, stats = env.admin.get_json("/stats?format=json")
            row = next((r for r in stats.get("tls", []) if r["plane"] == "oam"), {})
            done = row.get("rbac_denied", 0) >= 1 and row.get("peer_cert_refused", 0) >= 1
            return row if done and row.get("plaintext_refused", 0) >= 1 and row.get("handshakes", 0) >= 3 else {}

        # the workers' counters reach the agent's /stats in their own time: wait for all of them, the last
        # handshake's included (it flaked when the refusals had arrived and the last handshake not yet)
        row = eventually(tls_row, 10, 0.3)
        assert row and row["handshakes"] >= 3, row
        assert env.agent.poll() is None
