"""Istio auto-mTLS for relayed TCP in the real data path: istiod's own resources (tests/xds/istio_corpus: the
mysql VirtualService listener `10.96.9.9_3306` to subset v2, the auto-protocol listener `10.96.7.7_5000` with
its HTTP chain, its TCP chain and the PassthroughCluster default chain, their clusters with
`transport_socket_matches`, the route configuration), re-aimed at the lab's server pod, endpoints labelled
`tlsMode: istio` as istiod labels pods with a sidecar, served by `planemesh xds-server --ca` (SDS `default` and
`ROOTCA`, as istio-agent serves them). The server pod runs mTLS servers that require a client certificate from
the CA, as a sidecar would.

The eBPF interception sends the client pod's plaintext connections to the plane's sniffing listener (not the
kernel bypass: the chains' clusters originate TLS), which relays them over mTLS with the agent's SPIFFE
identity: the TCP service gets the client's bytes over mTLS; on the auto-protocol port, HTTP goes through the
routes (originated over mTLS too) and the bytes that are not HTTP through the TCP chain's cluster, as Envoy
does. A server whose certificate names another identity gets nothing, and the refusal is counted."""

from __future__ import annotations

import copy
import hashlib
import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from planemesh.agent.identity.ca import key_pem, new_root, spiffe_ids, utcnow
from planemesh.agent.identity.ca_files import write_root_ca
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.labs import load_lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.netns import call_in
from planemesh.model.static_config import default_config_text
from planemesh.xds.conformance import CORPUS
from tests.netns.agent_lab import eventually, running_agent
from tests.support.servers import AcceptLoop

pytestmark = pytest.mark.netns

MYSQL, METRICS = "outbound|3306|v2|mysql.default.svc.cluster.local", "outbound|5000||metrics.default.svc.cluster.local"
IMPOSTOR = "outbound|3307|v2|mysql.default.svc.cluster.local"
DB_PORT, METRICS_PORT, IMPOSTOR_PORT = 13306, 15000, 13307  # the mTLS servers in the server pod
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/productpage"  # the agent's SDS identity (bootstrap metadata)


def _corpus(fname: str) -> dict[str, dict]:
    items = json.loads((CORPUS / fname).read_text())
    return {item.get("name") or item["cluster_name"]: item for item in items}


def expected_san(cluster: dict) -> str:
    """The server identity istiod's cluster asks for (its tlsMode-istio match's SAN matcher)."""
    tls = cluster["transport_socket_matches"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    return tls["combined_validation_context"]["default_validation_context"]["match_subject_alt_names"][0]["exact"]


def _endpoint(name: str, host: str, port: int) -> dict:
    """istiod's endpoint of a pod with a sidecar: its address and `tlsMode: istio`."""
    return {"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": host, "port_value": port}}},
                "metadata": {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"},
                                                 "istio": {"workload": "v2;default;db;v2;Kubernetes"}}}}]}]}


def istiod_push(host: str) -> list[dict]:
    listeners, clusters, routes = (_corpus(f) for f in ("listeners.json", "clusters.json", "routes.json"))
    mysql = copy.deepcopy(listeners["10.96.9.9_3306"])
    auto = copy.deepcopy(listeners["10.96.7.7_5000"])
    for lsn in (mysql, auto):  # the service VIP becomes the server pod's address (the lab assigned it)
        port = lsn["address"]["socket_address"]["port_value"]
        lsn["address"]["socket_address"]["address"] = host
        lsn["name"] = f"{host}_{port}"
    impostor = json.loads(json.dumps(mysql).replace(MYSQL, IMPOSTOR).replace("3306", "3307"))
    impostor_cluster = json.loads(json.dumps(clusters[MYSQL]).replace(MYSQL, IMPOSTOR))
    return [
        mysql, auto, impostor, routes["metrics.default.svc.cluster.local:5000"],
        clusters["PassthroughCluster"], clusters[MYSQL], clusters[METRICS], impostor_cluster,
        _endpoint(MYSQL, host, DB_PORT), _endpoint(METRICS, host, METRICS_PORT),
        _endpoint(IMPOSTOR, host, IMPOSTOR_PORT),
    ]  # fmt: skip


class MtlsServer:
    """An mTLS server in the server pod (its socket made inside the pod's namespace), requiring a client
    certificate from the CA: it records each client's SPIFFE ID and answers HTTP requests with HTTP, anything
    else after the client's EOF with `mtls:<client id>:<sha256 of what it read>`."""

    def __init__(self, ns: str, host: str, port: int, root: Any, who: str, tmp: Path) -> None:
        issued = root.issue(parse_spiffe_id(who), now=utcnow())
        pem = tmp / f"server-{port}.pem"
        pem.write_bytes(issued.cert_chain_pem() + key_pem(issued.key))
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pem)
        self.ctx.load_verify_locations(cadata=root.root_pem().decode())
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.clients: list[list[str]] = []
        self.seen: list[bytes] = []
        self.log: list[str] = []
        self.loop = AcceptLoop(call_in(ns, socket.create_server, (host, port)), self._serve)

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                peer = spiffe_ids(x509.load_der_x509_certificate(conn.getpeercert(binary_form=True)))
                self.clients.append(peer)
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                    if data.startswith(b"GET ") and b"\r\n\r\n" in data:
                        body = f"mtls-http {peer[0]}".encode()
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                                     % (len(body), body))  # fmt: skip
                        return
                self.seen.append(data)
                conn.sendall(b"mtls:%s:%s" % (peer[0].encode(), hashlib.sha256(data).hexdigest().encode()))
        except (OSError, ssl.SSLError) as exc:
            self.log.append(repr(exc))
            self.seen.append(b"")  # a refused or broken connection: nothing of the client's was read

    def close(self) -> None:
        self.loop.close()


def exchange(host: str, port: int, payload: bytes) -> bytes:
    """From the client pod: send, half-close, read until the peer closes."""
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
    except OSError:
        return b"<refused>"


def test_istiod_resources_drive_mtls_originated_relayed_tcp(run_prefix: str, tmp_path: Path) -> None:
    root = new_root("cluster.local", now=utcnow())
    write_root_ca(tmp_path / "ca", root)
    res = tmp_path / "resources"
    res.mkdir()
    sock = tmp_path / "xds.sock"
    boot = tmp_path / "bootstrap.yaml"
    boot.write_text(yaml.safe_dump({
        "node": {"id": "sidecar~198.18.1.2~productpage-v1.default~default.svc.cluster.local",
                 "metadata": {"NAMESPACE": "default", "SERVICE_ACCOUNT": "productpage"}},
        "server": {"address": f"unix://{sock}"}, "timing": {"backoff_base_s": 0.1, "backoff_max_s": 0.5},
        "planes": yaml.safe_load(default_config_text())["planes"]}))  # fmt: skip
    clusters = _corpus("clusters.json")
    prefix = f"{run_prefix}u"
    host = load_lab(prefix=prefix).pod_addr("server", "oam", 4)  # the lab's address, known before it exists
    assert host is not None
    (res / "istiod.yaml").write_text(yaml.safe_dump(istiod_push(host)))
    argv = [sys.executable, "-m", "planemesh.agent.cli", "xds-server", "--resources", str(res), "--listen",
            f"unix://{sock}", "--ca", str(tmp_path / "ca")]  # fmt: skip
    xds = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers: list[MtlsServer] = []
    try:
        assert eventually(sock.exists, timeout=15), "xds-server did not start"
        with running_agent(prefix, ["--bootstrap", str(boot)]) as env:
            server_ns = env.lab.pod_ns("server")
            db = MtlsServer(server_ns, host, DB_PORT, root, expected_san(clusters[MYSQL]), tmp_path)
            metrics = MtlsServer(server_ns, host, METRICS_PORT, root, expected_san(clusters[METRICS]), tmp_path)
            impostor = MtlsServer(server_ns, host, IMPOSTOR_PORT, root, "spiffe://cluster.local/ns/x/sa/impostor",
                                  tmp_path)  # fmt: skip
            servers += [db, metrics, impostor]
            client = env.client_ns
            payload = b"\x0a5.7.0-mysql-handshake\x00" * 100
            want = b"mtls:%s:%s" % (CLIENT_ID.encode(), hashlib.sha256(payload).hexdigest().encode())
            got = eventually(lambda: call_in(client, exchange, host, 3306, payload) == want, timeout=20)
            assert got, call_in(client, exchange, host, 3306, payload)
            assert db.clients[-1] == [CLIENT_ID] and db.seen[-1] == payload

            # The auto-protocol port: not HTTP -> the TCP chain's cluster, over mTLS (before: the original
            # destination, server:5000, where nothing listens); HTTP -> the route, over mTLS as well.
            binary = b"\x00\x01\x02 not http"
            assert call_in(client, exchange, host, 5000, binary) == b"mtls:%s:%s" % (
                CLIENT_ID.encode(), hashlib.sha256(binary).hexdigest().encode())  # fmt: skip
            curl = ["curl", "-sS", "--max-time", "5", "-H", "host: metrics.default.svc.cluster.local",
                    f"http://{host}:5000/page"]  # fmt: skip
            out = ns_tools.run(client, curl, check=False)
            assert out.stdout == f"mtls-http {CLIENT_ID}", out

            # A server with another identity: refused after the handshake, never sent a byte, counted.
            assert call_in(client, exchange, host, 3307, b"secret") in (b"", b"<refused>")
            assert not any(impostor.seen) and impostor.clients in ([], [[CLIENT_ID]]), (impostor.seen, impostor.log)

            def origin() -> dict:
                _, stats = env.admin.get_json("/stats?format=json")
                row = next((r for r in stats.get("sniff", []) if r["plane"] == "oam"), {})
                tls = row.get("upstream_tls", {})
                return tls if tls.get("san_refused", 0) >= 1 and tls.get("handshakes", 0) >= 2 else {}

            counted = eventually(origin, timeout=10, interval=0.3)
            assert counted and counted["failed"] >= 1, counted
            prom = env.admin.get("/stats").body.decode()
            assert 'planemesh_passthrough_upstream_tls_total{outcome="san_refused",plane="oam"}' in prom or (
                'planemesh_passthrough_upstream_tls_total{plane="oam",outcome="san_refused"}' in prom)
            assert env.agent.poll() is None
    finally:
        for srv in servers:
            srv.close()
        xds.kill()
        xds.wait()
