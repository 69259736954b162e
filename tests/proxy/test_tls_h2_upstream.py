"""TLS origination to an HTTP/2 upstream: a real nginx serving h2 over TLS and requiring a client certificate
from the built-in CA. h2 and HTTP/1.1 clients of the proxy reach it over mTLS h2 (before: NACKed at
translation, or 503); a backend whose SAN does not match gets nothing."""

from __future__ import annotations

import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest

from planemesh.agent.identity.ca import key_pem
from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.model.config import Cluster, ClusterKind, Endpoint
from planemesh.model.tls_config import CertSecret, SanMatch, TlsContext, TrustSecret
from tests.proxy.proxy_harness import PLANE, ServingProxy, free_port, make_snapshot
from tests.proxy.test_tls_origination import BACKEND_ID, NOW, PROXY_ID, ROOT

NGINX = "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx not installed")


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    work = tmp_path_factory.mktemp("nginx-tls")
    (work / "www").mkdir()
    (work / "www" / "index.html").write_text("hello over h2 and mTLS\n")
    issued = ROOT.issue(BACKEND_ID, now=NOW)
    (work / "cert.pem").write_bytes(issued.cert_chain_pem())
    (work / "key.pem").write_bytes(key_pem(issued.key))
    (work / "root.pem").write_bytes(ROOT.root_pem())
    port, log = free_port(), work / "access.log"
    (work / "nginx.conf").write_text(textwrap.dedent(f"""\
        daemon off; master_process off; worker_processes 1; pid {work}/nginx.pid;
        error_log {work}/error.log;
        events {{ worker_connections 256; }}
        http {{
          log_format tls '$server_protocol $ssl_protocol $ssl_client_verify $ssl_server_name $request_uri $status';
          access_log {log} tls;
          client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
          uwsgi_temp_path {work}; scgi_temp_path {work};
          server {{
            listen 127.0.0.1:{port} ssl http2;
            ssl_certificate {work}/cert.pem; ssl_certificate_key {work}/key.pem;
            ssl_client_certificate {work}/root.pem; ssl_verify_client on; ssl_protocols TLSv1.2 TLSv1.3;
            root {work}/www;
          }}
        }}
    """))  # fmt: skip
    proc = subprocess.Popen([NGINX, "-c", str(work / "nginx.conf"), "-e", str(work / "error.log")])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"nginx did not start: {(work / 'error.log').read_text()}") from None
                time.sleep(0.05)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(10)


def proxy_for(port: int, san: str = str(BACKEND_ID)) -> ServingProxy:
    sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
    base = make_snapshot(sock.getsockname()[1], [])
    tls = TlsContext(cert="default", trust="ROOTCA", san=(SanMatch("uri", exact=san),), sni="udm.ran.svc",
                     alpn=("h2",))  # fmt: skip
    cluster = Cluster("backend", ClusterKind.STATIC, http2=True, tls=tls, endpoints=(Endpoint("127.0.0.1", port),))
    mine = ROOT.issue(PROXY_ID, now=NOW)
    secrets = {"default": CertSecret(mine.cert_chain_pem(), mine.key_pem()), "ROOTCA": TrustSecret(ROOT.root_pem())}
    snap = replace(base, clusters=MappingProxyType({"backend": cluster}), secrets=MappingProxyType(secrets))
    return ServingProxy(PlaneProxy(snap, PLANE), sock)


def curl(port: int, path: str, *extra: str) -> str:
    args = ["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", *extra]
    return subprocess.run([*args, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True).stdout


def log_lines(log: Path, wanted: int) -> list[str]:
    deadline = time.monotonic() + 3  # nginx writes the line after the response
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= wanted:
            return lines
        time.sleep(0.05)
    return log.read_text().splitlines() if log.exists() else []


def test_h2_and_http1_clients_reach_an_h2_upstream_over_mtls(nginx) -> None:
    port, log = nginx
    before = len(log_lines(log, 0))
    with proxy_for(port) as px:
        assert curl(px.port, "/index.html", "--http2-prior-knowledge") == "200"
        assert curl(px.port, "/index.html?h1") == "200"
    lines = log_lines(log, before + 2)[before:]
    assert lines == [
        "HTTP/2.0 TLSv1.3 SUCCESS udm.ran.svc /index.html 200",
        "HTTP/2.0 TLSv1.3 SUCCESS udm.ran.svc /index.html?h1 200",
    ], lines  # h2 over TLS 1.3, our client certificate verified, the cluster's SNI


def test_an_h2_upstream_with_the_wrong_san_gets_nothing(nginx) -> None:
    port, log = nginx
    before = len(log_lines(log, 0))
    with proxy_for(port, san="spiffe://cluster.local/ns/ran/sa/other") as px:
        assert curl(px.port, "/index.html", "--http2-prior-knowledge") == "503"
        assert curl(px.port, "/index.html?h1") == "503"
    time.sleep(0.3)
    assert log_lines(log, 0)[before:] == []
