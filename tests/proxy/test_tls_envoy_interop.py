"""mTLS interop with the real Envoy 1.40 on loopback, every certificate from planemesh's built-in CA:
Envoy as an mTLS client of planemesh (its UpstreamTlsContext checks planemesh's SPIFFE SAN; planemesh requires
and logs Envoy's), and Envoy as an mTLS server behind planemesh (planemesh originates with its SPIFFE
certificate, Envoy requires it, planemesh checks Envoy's SAN)."""

from __future__ import annotations

import base64
import os
import subprocess
import urllib.request
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

from planemesh.agent.identity.ca import key_pem, utcnow
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.model.tls_config import CertSecret, SanMatch, TlsContext, TrustSecret
from tests.proxy.proxy_harness import PLANE, Backend, ServingProxy, free_port, make_snapshot
from tests.proxy.test_tls_termination import GW, ROOT, TlsProxy, log_line_for
from tests.xds.xds_harness import ENVOY, wait_for

T = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
ENVOY_ID = parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/envoy")


def _inline(issued) -> dict:
    return {
        "tls_certificates": [
            {
                "certificate_chain": {"inline_bytes": _b64(issued.cert_chain_pem())},
                "private_key": {"inline_bytes": _b64(key_pem(issued.key))},
            }
        ],
        "validation_context": {
            "trusted_ca": {"inline_bytes": _b64(ROOT.root_pem())},
        },
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _hcm(route: dict) -> dict:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager",
            "stat_prefix": "x",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }
            ],
        },
    }


class EnvoyProc:
    def __init__(self, workdir: Path, listeners: list, clusters: list) -> None:
        self.admin = free_port()
        cfg = {
            "node": {"id": "interop", "cluster": "interop"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin}}},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        }
        path = workdir / "envoy.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.log = workdir / "envoy.log"
        base_id = 2000 + (os.getpid() * 11 + self.admin) % 50000
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [str(ENVOY), "-c", str(path), "--base-id", str(base_id), "--concurrency", "1", "-l", "warning",
                 "--disable-hot-restart"], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        wait_for(self._ready, 15, "envoy ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"envoy exited: {self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stats(self, prefix: str) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/stats?filter={prefix}", timeout=2) as r:
            lines = r.read().decode().splitlines()
        return {k: int(v) for k, v in (line.split(": ", 1) for line in lines) if v.strip().isdigit()}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def curl(url: str) -> str:
    out = subprocess.run(["curl", "-sS", "--max-time", "5", url, "-w", " %{http_code}"], capture_output=True,
                         text=True, check=False)  # fmt: skip
    return out.stdout


@pytest.fixture(scope="module")
def backend():
    with Backend() as b:
        yield b


def test_envoy_is_an_mtls_client_of_planemesh(backend, tmp_path):
    with TlsProxy(backend.port) as px:
        port = free_port()
        envoy_cert = ROOT.issue(ENVOY_ID, now=utcnow())
        ctx = _inline(envoy_cert)
        ctx["validation_context"]["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": str(GW)}}
        ]
        cluster = {
            "name": "planemesh",
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {"cluster_name": "planemesh", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": px.port}}}}]}]},
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": T + "UpstreamTlsContext", "common_tls_context": {**ctx, "alpn_protocols": ["http/1.1"]}}},
        }  # fmt: skip
        listener = {
            "name": "in",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [_hcm({"match": {"prefix": "/"}, "route": {"cluster": "planemesh"}})]}],
        }
        envoy = EnvoyProc(tmp_path, [listener], [cluster])
        try:
            assert curl(f"http://127.0.0.1:{port}/via-envoy").endswith(" 200")
            assert log_line_for(px, "/via-envoy").endswith(f'"{ENVOY_ID}"')  # Envoy's identity, as planemesh saw it
            assert envoy.stats("cluster.planemesh.ssl.handshake")["cluster.planemesh.ssl.handshake"] >= 1
        finally:
            envoy.stop()


def test_envoy_is_an_mtls_server_behind_planemesh(tmp_path):
    envoy_port = free_port()
    server_cert = ROOT.issue(ENVOY_ID, now=utcnow())
    listener = {
        "name": "mtls",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": envoy_port}},
        "filter_chains": [{
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": T + "DownstreamTlsContext", "require_client_certificate": True,
                "common_tls_context": {**_inline(server_cert), "validation_context": {
                    "trusted_ca": {"inline_bytes": _b64(ROOT.root_pem())},
                    "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": str(GW)}}]}}}},
            "filters": [_hcm({"match": {"prefix": "/"}, "direct_response": {
                "status": 200, "body": {"inline_string": "envoy says hi"}}})],
        }],
    }  # fmt: skip
    envoy = EnvoyProc(tmp_path, [listener], [])
    sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
    base = make_snapshot(sock.getsockname()[1], [("127.0.0.1", envoy_port)])
    mine = ROOT.issue(GW, now=utcnow())
    tls = TlsContext(cert="default", trust="ROOTCA", san=(SanMatch("uri", exact=str(ENVOY_ID)),), sni="envoy.ran")
    snap = replace(
        base,
        clusters=MappingProxyType({"backend": replace(base.clusters["backend"], tls=tls)}),
        secrets=MappingProxyType(
            {"default": CertSecret(mine.cert_chain_pem(), mine.key_pem()), "ROOTCA": TrustSecret(ROOT.root_pem())}
        ),
    )
    try:
        with ServingProxy(PlaneProxy(snap, PLANE), sock) as px:
            assert curl(f"http://127.0.0.1:{px.port}/to-envoy") == "envoy says hi 200"
        stats = envoy.stats("listener.127.0.0.1")
        assert any(k.endswith("ssl.handshake") and v >= 1 for k, v in stats.items()), stats
    finally:
        envoy.stop()
