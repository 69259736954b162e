"""A plane SLA's strict mTLS in the real data path: plane oam says `mtls: strict` (its certificate and roots over
SDS from `planemesh xds-server --ca`, trust domain cluster.local) and sniffs undeclared ports; media says
nothing. istiod-style `0.0.0.0_9000` (tcp_proxy to an ORIGINAL_DST cluster, which the kernel bypasses) applies to
both planes: on media the eBPF program still bypasses it (plaintext gets the lab's TCP server), on oam it hands
it to the plane's proxy, which refuses plaintext and terminates the mTLS client's connection before relaying its
bytes; istiod-style `0.0.0.0_9001` with traffic_direction OUTBOUND (a pod's egress) keeps the bypass and plaintext on
oam. An undeclared HTTP port on oam is sniffed only inside mTLS: curl with a client certificate gets the lab's
HTTP server, plaintext and another CA's client are refused; the agent keeps serving."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from planemesh.agent.demo import BYPASS_HTTP_PORT, TCP_PORT, UNDECLARED_TCP_PORT
from planemesh.agent.identity.ca import new_root, utcnow
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import ca_xds_server, eventually, running_agent, write_client_certs
from tests.netns.test_mtls_lab import CLIENT
from tests.netns.test_sniff_mtls_lab import client

pytestmark = pytest.mark.netns
T = "type.googleapis.com/envoy."


def resources() -> list[dict]:
    tcp = {"name": "tcp", "typed_config": {"@type": T + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                           "stat_prefix": "db", "cluster": "PassthroughCluster"}}  # fmt: skip
    listener = {"@type": T + "config.listener.v3.Listener", "name": f"0.0.0.0_{TCP_PORT}",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": TCP_PORT}},
                "filter_chains": [{"filters": [tcp]}]}  # fmt: skip
    passthrough = {"@type": T + "config.cluster.v3.Cluster", "name": "PassthroughCluster", "type": "ORIGINAL_DST",
                   "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s"}  # fmt: skip
    # a pod's egress through istiod's outbound listener: not the strict plane's to demand mTLS from (bypassed)
    egress = {**listener, "name": f"0.0.0.0_{UNDECLARED_TCP_PORT}", "traffic_direction": "OUTBOUND",
              "address": {"socket_address": {"address": "0.0.0.0", "port_value": UNDECLARED_TCP_PORT}}}  # fmt: skip
    return [listener, egress, passthrough]


def planes() -> list[dict]:
    out = yaml.safe_load(default_config_text())["planes"]
    oam = next(p for p in out if p["name"] == "oam")
    oam["undeclared"] = "sniff"
    oam["sla"] = {**(oam.get("sla") or {}), "mtls": "strict", "mtls_trust_domain": "cluster.local"}
    return out


def tcp(env, plane: str, certs: Path, who: str | None, payload: str, port: int = TCP_PORT) -> bytes:
    """The lab's TCP server on TCP_PORT answers `peer <address>` then echoes (tests/netns/sniff_mtls_client.py)."""
    return client(env.client_ns, env.server(plane, 4), certs, who, "istio-peer-exchange", payload, port)


def curl(env, certs: Path, who: str | None, scheme: str = "https") -> str:
    auth = ["--cert", certs / f"{who}.pem", "--key", certs / f"{who}.key"] if who else []
    url = f"{scheme}://{env.server('oam', 4)}:{BYPASS_HTTP_PORT}/sniffed"
    argv = ["curl", "-sS", "-k", "--max-time", "5", *auth, url, "-o", "/dev/null", "-w", "%{http_code}"]
    out = subprocess.run(["ip", "netns", "exec", env.client_ns, *argv], capture_output=True, text=True, check=False)
    return out.stdout


def test_strict_plane_takes_its_tcp_chain_from_the_kernel_bypass_and_requires_mtls(
    run_prefix: str, tmp_path: Path
) -> None:
    with ca_xds_server(tmp_path, resources()) as (sock, root):
        other_ca = new_root("cluster.local", now=utcnow())
        certs = write_client_certs(tmp_path / "certs", {"amf": (root, CLIENT), "foreign": (other_ca, CLIENT)})
        boot = tmp_path / "bootstrap.yaml"
        boot.write_text(yaml.safe_dump({
            "node": {"id": "lab-node"}, "server": {"address": f"unix://{sock}"},
            "timing": {"backoff_base_s": 0.1, "backoff_max_s": 0.5}, "planes": planes()}))  # fmt: skip
        with running_agent(f"{run_prefix}p", ["--bootstrap", str(boot)]) as env:

            def mtls_tcp() -> bytes:
                return tcp(env, "oam", certs, "amf", "ping\\n")

            assert eventually(lambda: mtls_tcp().endswith(b"ping\n"), 20, 0.3), mtls_tcp()
            assert mtls_tcp().startswith(b"peer ")  # terminated by oam's proxy, relayed to the server pod
            assert tcp(env, "oam", certs, None, "plain\\n") == b""  # plaintext: refused, nothing relayed
            assert tcp(env, "oam", certs, "foreign", "ping\\n") == b""  # another CA
            # an OUTBOUND listener (a pod's egress): plaintext as before, bypassed in the kernel (the server sees the
            # client's own address; the proxy's relay comes from the node's)
            egress = tcp(env, "oam", certs, None, "egress\\n", UNDECLARED_TCP_PORT)
            assert egress == f"peer {env.client('oam', 4)}\negress\n".encode(), egress
            media = tcp(env, "media", certs, None, "plain\\n")  # media: the kernel's bypass, as before
            assert media.startswith(b"peer ") and media.endswith(b"plain\n"), media
            assert eventually(lambda: curl(env, certs, "amf") == "200", 10, 0.3), curl(env, certs, "amf")
            assert curl(env, certs, None, "http") != "200"  # plaintext to a sniffed port of a strict plane
            assert curl(env, certs, "foreign") != "200"
            assert curl(env, certs, "amf") == "200"  # others unaffected

            def oam_tls() -> dict:
                _, stats = env.admin.get_json("/stats?format=json")
                row = next((r for r in stats.get("tls", []) if r["plane"] == "oam"), {})
                done = row.get("plaintext_refused", 0) >= 2 and row.get("peer_cert_refused", 0) >= 2
                return row if done and row.get("handshakes", 0) >= 4 else {}

            row = eventually(oam_tls, 10, 0.3)
            assert row, env.admin.get_json("/stats?format=json")[1].get("tls")
            media_tls = next((r for r in env.admin.get_json("/stats?format=json")[1].get("tls", [])
                              if r["plane"] == "media"), {})  # fmt: skip
            assert media_tls.get("handshakes", 0) == 0 and media_tls.get("plaintext_refused", 0) == 0
            assert env.agent.poll() is None
