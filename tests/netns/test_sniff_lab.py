"""Sniffing in a real lab: the agent (BPF interception + workers) with `undeclared: sniff` on plane oam.

Undeclared ports on oam: HTTP/1.1 and h2 prior knowledge are proxied (the server sees x-request-id); TLS reaches
the TLS server untouched (the client verifies the server's own certificate) and its SNI is counted; binary and
server-first protocols pass byte-exact both ways, with half-close and 100 MB each way (SHA-256 at both ends).
Plane media keeps `undeclared: bypass` but declares, over xDS, a TLS port whose filter chains route by SNI.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from planemesh.agent.demo import BYPASS_HTTP_PORT
from planemesh.labs import load_lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.netns import call_in
from planemesh.labs.protocol_servers import (
    BANNER,
    banner_session,
    bulk_download,
    bulk_upload,
    reverse_exchange,
    self_signed_cert,
    tls_exchange,
)
from planemesh.labs.traffic import host_port, wait_for_port
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import AgentLab, eventually, running_agent

pytestmark = pytest.mark.netns

HTTP_PORT = BYPASS_HTTP_PORT  # the lab's HTTP server on a port no listener declares
TLS_PORT, SNI_PORT, ROUTED_PORT = 4443, 8443, 9443
SPLIT_PORT = 7010  # a weighted tcp_proxy split on plane media; nothing listens there on the server
ROUTED_TCP_PORT = 7011  # a VirtualService tcp route to another service; nothing listens there either
REVERSE_SERVICE = f"outbound|{7000}||reverse.default.svc.cluster.local"
BANNER_PORT, REVERSE_PORT, BULK_PORT = 2525, 7000, 7001
BULK_SIZE = 100 * 1024 * 1024

T = "type.googleapis.com/envoy."
TCP_PROXY = T + "extensions.filters.network.tcp_proxy.v3.TcpProxy"


def planes_config() -> dict[str, Any]:
    raw = yaml.safe_load(default_config_text())
    raw["planes"][0]["undeclared"] = "sniff"  # oam sniffs; media keeps bypass
    raw.pop("listeners")  # listeners come over xDS
    return raw


def xds_resources(routed_endpoint: str) -> list[dict[str, Any]]:
    def tcp_chain(name: str, cluster: str, **match: Any) -> dict[str, Any]:
        chain = {"name": name, "filters": [{"name": "tcp", "typed_config": {
            "@type": TCP_PROXY, "stat_prefix": name, "cluster": cluster}}]}  # fmt: skip
        return {**chain, "filter_chain_match": match} if match else chain

    def static_cluster(name: str, address: str, port: int) -> dict[str, Any]:
        return {"@type": T + "config.cluster.v3.Cluster", "name": name, "type": "STATIC", "connect_timeout": "2s",
                "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": address, "port_value": port}}}}]}]}}  # fmt: skip

    hcm = T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    return [
        {"@type": T + "config.listener.v3.Listener", "name": "http_80",
         "address": {"socket_address": {"address": "0.0.0.0", "port_value": 80}},
         "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
             "@type": hcm, "stat_prefix": "http_80", "route_config": {"name": "orig", "virtual_hosts": [
                 {"name": "any", "domains": ["*"], "routes": [{"match": {"prefix": "/"},
                                                               "route": {"cluster": "passthrough"}}]}]},
             "http_filters": [{"name": "router", "typed_config": {
                 "@type": T + "extensions.filters.http.router.v3.Router"}}]}}]}]},
        # Plane media: TLS on 8443 routed by SNI; anything else on 8443 goes to the original destination.
        {"@type": T + "config.listener.v3.Listener", "name": "tls_8443",
         "address": {"socket_address": {"address": "0.0.0.0", "port_value": SNI_PORT}},
         "metadata": {"filter_metadata": {"planemesh": {"plane": "media"}}},
         "filter_chains": [tcp_chain("routed", "routed_tls", server_names=["*.routed.test"]),
                           tcp_chain("rest", "passthrough")]},
        # Plane media: a TCP port split by weight between two clusters (another server port each).
        {"@type": T + "config.listener.v3.Listener", "name": "split_7010",
         "address": {"socket_address": {"address": "0.0.0.0", "port_value": SPLIT_PORT}},
         "metadata": {"filter_metadata": {"planemesh": {"plane": "media"}}},
         "filter_chains": [{"name": "split", "filters": [{"name": "tcp", "typed_config": {
             "@type": TCP_PROXY, "stat_prefix": "split", "weighted_clusters": {"clusters": [
                 {"name": "split_reverse", "weight": 1}, {"name": "split_banner", "weight": 1}]}}}]}]},
        # Plane media: istiod's listener of a TCP service (its VIP: the server's media address, 7011) whose
        # VirtualService `tcp:` route sends it to another service: one cluster, not the original destination.
        {"@type": T + "config.listener.v3.Listener", "name": f"{routed_endpoint}_{ROUTED_TCP_PORT}",
         "address": {"socket_address": {"address": routed_endpoint, "port_value": ROUTED_TCP_PORT}},
         "bind_to_port": False,
         "filter_chains": [{"metadata": {"filter_metadata": {"istio": {
             "config": "/apis/networking.istio.io/v1alpha3/namespaces/default/virtual-service/to-reverse"}}},
             "filters": [{"name": "tcp", "typed_config": {"@type": TCP_PROXY, "stat_prefix": REVERSE_SERVICE,
                                                          "cluster": REVERSE_SERVICE}}]}]},
        static_cluster(REVERSE_SERVICE, routed_endpoint, REVERSE_PORT),
        static_cluster("split_reverse", routed_endpoint, REVERSE_PORT),
        static_cluster("split_banner", routed_endpoint, BANNER_PORT),
        {"@type": T + "config.cluster.v3.Cluster", "name": "passthrough", "type": "ORIGINAL_DST",
         "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s"},
        {"@type": T + "config.cluster.v3.Cluster", "name": "routed_tls", "type": "STATIC", "connect_timeout": "2s",
         "load_assignment": {"cluster_name": "routed_tls", "endpoints": [{"lb_endpoints": [{"endpoint": {
             "address": {"socket_address": {"address": routed_endpoint, "port_value": ROUTED_PORT}}}}]}]}},
    ]  # fmt: skip


@dataclass
class SniffLab:
    agent: AgentLab
    secure: tuple[Path, bytes]  # (cert.pem, DER) of the TLS servers on TLS_PORT and SNI_PORT
    routed: tuple[Path, bytes]  # ... of the TLS server on ROUTED_PORT, the SNI-routed chain's cluster

    def server(self, plane: str, version: int = 4) -> str:
        return self.agent.server(plane, version)

    def stats(self) -> dict[str, Any]:
        _, body = self.agent.admin.get_json("/stats?format=json")
        return body

    def sniff(self, plane: str) -> dict[str, Any]:
        return next((row for row in self.stats()["sniff"] if row["plane"] == plane), {})

    def curl(self, url: str, *extra: str) -> subprocess.CompletedProcess:
        return ns_tools.run(self.agent.client_ns, ["curl", "-sS", "--max-time", "5", *extra, url], check=False)


@pytest.fixture(scope="module")
def env(run_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SniffLab]:
    prefix = f"{run_prefix}s"
    work = tmp_path_factory.mktemp("sniff-lab")
    routed_endpoint = load_lab(prefix=prefix).pod_addr("server", "media", 4)
    (work / "planes.yaml").write_text(yaml.safe_dump(planes_config()))
    (work / "xds").mkdir()
    (work / "xds" / "resources.yaml").write_text(yaml.safe_dump(xds_resources(routed_endpoint or "")))
    secure_cert, secure_key, secure_der = self_signed_cert(work / "secure", "secure.lab")
    routed_cert, routed_key, routed_der = self_signed_cert(work / "routed", "routed.lab", "*.routed.test")
    args = ["--config", str(work / "planes.yaml"), "--xds-resources", str(work / "xds")]
    with running_agent(prefix, args) as lab:
        servers = ns_tools.start_until(
            lab.lab.pod_ns("server"),
            [sys.executable, "-m", "planemesh.labs.protocol_servers",
             "--tls", f"{TLS_PORT}:{secure_cert}:{secure_key}", "--tls", f"{SNI_PORT}:{secure_cert}:{secure_key}",
             "--tls", f"{ROUTED_PORT}:{routed_cert}:{routed_key}",
             "--banner", str(BANNER_PORT), "--reverse", str(REVERSE_PORT), "--bulk", str(BULK_PORT)],
            "ready",
        )  # fmt: skip
        try:
            wait_for_port(lab.client_ns, lab.server("oam", 4), BULK_PORT)
            yield SniffLab(lab, (secure_cert, secure_der), (routed_cert, routed_der))
        finally:
            ns_tools.stop(servers)


def grew(env: SniffLab, plane: str, before: dict[str, Any], check) -> dict[str, Any]:
    """The plane's sniff stats once `check(before, now)` holds (workers report every 0.5 s)."""
    return eventually(lambda: (now := env.sniff(plane)) and check(before, now) and now, timeout=5) or env.sniff(plane)


@pytest.mark.parametrize("version", [4, 6])
def test_http1_on_undeclared_port_is_proxied(env: SniffLab, version: int) -> None:
    before = env.sniff("oam")
    r = env.curl(f"http://{host_port(env.server('oam', version), HTTP_PORT)}/sniffed")
    assert r.returncode == 0, r.stderr
    seen = yaml.safe_load(r.stdout)
    assert seen["path"] == "/sniffed" and "x-request-id" in seen["headers"]
    assert seen["peer"] == env.agent.lab.node_addr("oam", version)  # the proxy's upstream leg
    after = grew(env, "oam", before, lambda b, a: a["verdicts"]["http1"] > b.get("verdicts", {}).get("http1", 0))
    assert after["verdicts"]["http1"] == before.get("verdicts", {}).get("http1", 0) + 1


def test_h2_prior_knowledge_on_undeclared_port_is_proxied(env: SniffLab) -> None:
    before = env.sniff("oam")
    url = f"http://{host_port(env.server('oam', 4), HTTP_PORT)}/h2"
    r = env.curl(url, "--http2-prior-knowledge", "-w", "\n%{http_version}")
    assert r.returncode == 0, r.stderr
    body, version = r.stdout.rsplit("\n", 1)
    assert version == "2"
    assert "x-request-id" in yaml.safe_load(body)["headers"]
    after = grew(env, "oam", before, lambda b, a: a["verdicts"]["h2"] > b.get("verdicts", {}).get("h2", 0))
    assert after["verdicts"]["h2"] == before.get("verdicts", {}).get("h2", 0) + 1


def test_tls_reaches_the_server_untouched_and_sni_is_counted(env: SniffLab) -> None:
    cert, der = env.secure
    result = call_in(env.agent.client_ns, tls_exchange, env.server("oam", 6), TLS_PORT, "secure.lab", cert, b"hello")
    assert result.peer_cert == der  # the server's own certificate: nothing in the path terminated TLS
    assert result.alpn == "h2" and result.reply == b"hello"
    row = grew(env, "oam", {}, lambda _b, a: a["sni"].get("secure.lab"))
    assert row["sni"]["secure.lab"] >= 1 and row["alpn"]["h2"] >= 1
    metrics = env.agent.admin.get("/stats").body.decode()
    assert 'planemesh_sniff_tls_sni_total{plane="oam",sni="secure.lab"}' in metrics


def test_declared_tls_port_routes_by_sni(env: SniffLab) -> None:
    """Plane media bypasses undeclared ports, yet its SNI-routed port is sniffed: *.routed.test goes to the
    chain's cluster (another server), other names to the original destination."""
    client, dst = env.agent.client_ns, env.server("media", 4)
    routed = call_in(client, tls_exchange, dst, SNI_PORT, "api.routed.test", env.routed[0])
    assert routed.peer_cert == env.routed[1] and routed.reply == b"ping"
    other = call_in(client, tls_exchange, dst, SNI_PORT, "secure.lab", env.secure[0])
    assert other.peer_cert == env.secure[1]

    def routes() -> dict[tuple[str, str], int]:
        return {(r["chain"], r["sni"]): r["connections"] for r in env.stats()["sni_routes"] if r["plane"] == "media"}

    seen = eventually(lambda: (found := routes()).get(("rest", "secure.lab")) and found) or routes()
    assert seen[("routed", "api.routed.test")] == 1 and seen[("rest", "secure.lab")] == 1


def _which_server(address: str, port: int) -> str:
    """Which lab server answered a connection to address:port: the banner (server-first) or the reverse one."""
    with socket.create_connection((address, port), timeout=5) as conn:
        conn.sendall(b"ping\n")
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    if reply.startswith(BANNER):
        return "banner"
    return "reverse" if reply == hashlib.sha256(b"ping\n").digest() + b"\ngnip" else f"other: {reply[:40]!r}"


def test_weighted_tcp_split_is_relayed_to_both_clusters(env: SniffLab) -> None:
    """A plain tcp_proxy with weighted_clusters cannot be a kernel bypass (the original destination is one
    place, and nothing listens there): the plane's proxy relays each connection to a cluster, 1:1 by weight."""
    dst = env.server("media", 4)
    answers = [call_in(env.agent.client_ns, _which_server, dst, SPLIT_PORT) for _ in range(6)]
    assert sorted(answers) == ["banner"] * 3 + ["reverse"] * 3, answers


def test_single_cluster_tcp_route_goes_to_its_cluster(env: SniffLab) -> None:
    """A tcp_proxy chain with ONE cluster that is not the original destination (istio: a VirtualService tcp route
    to another service) is relayed to that cluster. Before, every single-cluster chain was a kernel bypass: the
    connection went to server:7011, where nothing listens, and was refused."""
    dst = env.server("media", 4)
    assert [call_in(env.agent.client_ns, _which_server, dst, ROUTED_TCP_PORT) for _ in range(2)] == ["reverse"] * 2


def test_binary_protocol_is_byte_exact_with_half_close(env: SniffLab) -> None:
    payload = bytes(range(256)) * 4096 + os.urandom(1 << 20)
    before = env.sniff("oam")
    reply = call_in(env.agent.client_ns, reverse_exchange, env.server("oam", 4), REVERSE_PORT, payload)
    assert reply[:32] == hashlib.sha256(payload).digest() and reply[32:] == payload[::-1]
    after = grew(
        env, "oam", before, lambda b, a: a["passthrough_bytes_up"] >= b.get("passthrough_bytes_up", 0) + len(payload)
    )
    assert after["passthrough_bytes_down"] >= before.get("passthrough_bytes_down", 0) + len(reply)


def test_server_first_protocol_passes_after_the_sniff_timeout(env: SniffLab) -> None:
    before = env.sniff("oam")
    banner, rest = call_in(
        env.agent.client_ns, banner_session, env.server("oam", 6), BANNER_PORT, [b"EHLO lab\r\n", b"QUIT\r\n"]
    )
    assert banner == BANNER
    assert rest == b"250 EHLO lab\r\n250 QUIT\r\n221 bye\r\n"  # answered after our half-close
    after = grew(env, "oam", before, lambda b, a: a["silent_clients"] > b.get("silent_clients", 0))
    assert after["silent_clients"] == before.get("silent_clients", 0) + 1


def test_100_mb_each_way_intact(env: SniffLab) -> None:
    before = env.sniff("oam")
    client, dst = env.agent.client_ns, env.server("oam", 4)
    up = call_in(client, bulk_upload, dst, BULK_PORT, BULK_SIZE)
    down = call_in(client, bulk_download, dst, BULK_PORT, BULK_SIZE)
    assert up.intact, (up.transferred, up.local_digest.hex(), up.remote_digest.hex())
    assert down.intact, (down.transferred, down.local_digest.hex(), down.remote_digest.hex())
    after = grew(
        env, "oam", before, lambda b, a: a["passthrough_bytes_down"] >= b.get("passthrough_bytes_down", 0) + BULK_SIZE
    )
    assert after["passthrough_bytes_up"] >= before.get("passthrough_bytes_up", 0) + BULK_SIZE
    assert after["passthrough_connections"] >= before.get("passthrough_connections", 0) + 2
