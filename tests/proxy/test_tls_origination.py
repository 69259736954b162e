"""TLS origination to a real TLS backend (Python's ssl server requiring client certificates), certificates from the
built-in CA: the proxy presents its SPIFFE certificate, sends the cluster's SNI and checks the backend's SPIFFE
SAN; a backend with the wrong SAN or from another CA is never sent the request (503 UF); an HTTP/2 client's
request to a TLS cluster goes over mTLS too (h2 upstreams over TLS: tests/proxy/test_tls_h2_upstream.py)."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
from cryptography import x509

from planemesh.agent.identity.ca import key_pem, new_root, spiffe_ids, utcnow
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.model.tls_config import CertSecret, SanMatch, TlsContext, TrustSecret
from tests.proxy.proxy_harness import PLANE, Backend, ServingProxy, make_snapshot

NOW = utcnow()
ROOT = new_root("cluster.local", now=NOW)
OTHER = new_root("cluster.local", now=NOW)
PROXY_ID = parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/planemesh")
BACKEND_ID = parse_spiffe_id("spiffe://cluster.local/ns/ran/sa/udm")


def mtls_server_context(ca, who, now, ttl_s: float) -> tuple[ssl.SSLContext, Path]:
    """A server context with `who`'s certificate issued by `ca`, requiring a client certificate from ROOT; and
    the scratch directory holding its PEM."""
    issued = ca.issue(who, now=now, ttl_s=ttl_s)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "c.pem").write_bytes(issued.cert_chain_pem() + key_pem(issued.key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "c.pem")
    ctx.load_verify_locations(cadata=ROOT.root_pem().decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx, tmp


class TlsBackend(Backend):
    """The harness backend behind TLS, requiring a client certificate from ROOT."""

    def __init__(self, ca=ROOT, now=NOW, ttl_s: float = 3600) -> None:
        super().__init__()
        ctx, self.tmp = mtls_server_context(ca, BACKEND_ID, now, ttl_s)
        self.sni: list[str | None] = []
        self.clients: list[list[str]] = []
        ctx.sni_callback = lambda obj, name, _ctx: self.sni.append(name)
        self.socket = ctx.wrap_socket(self.socket, server_side=True)

    def get_request(self):
        conn, addr = super().get_request()
        self.clients.append(spiffe_ids(x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))))
        return conn, addr


def proxy_for(backend_port: int, san: str = str(BACKEND_ID)) -> ServingProxy:
    sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
    base = make_snapshot(sock.getsockname()[1], [("127.0.0.1", backend_port)])
    mine = ROOT.issue(PROXY_ID, now=NOW)
    tls = TlsContext(cert="default", trust="ROOTCA", san=(SanMatch("uri", exact=san),), sni="udm.ran.svc",
                     alpn=("http/1.1",))  # fmt: skip
    clusters = {**base.clusters, "backend": replace(base.clusters["backend"], tls=tls)}
    secrets = {"default": CertSecret(mine.cert_chain_pem(), mine.key_pem()), "ROOTCA": TrustSecret(ROOT.root_pem())}
    snap = replace(base, clusters=MappingProxyType(clusters), secrets=MappingProxyType(secrets))
    return ServingProxy(PlaneProxy(snap, PLANE), sock)


def get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.fixture()
def backend():
    with TlsBackend() as b:
        yield b


def test_origination_presents_our_identity_sends_sni_and_checks_the_backend(backend):
    with proxy_for(backend.port) as px:
        for path in ("/one", "/two"):
            reply = get(px.port, path)
            assert reply.startswith(b"HTTP/1.1 200") and f"hello {path}".encode() in reply, reply
        assert backend.sni[0] == "udm.ran.svc" and backend.clients[0] == [str(PROXY_ID)]
        assert [p for _, p, _ in backend.seen] == ["/one", "/two"]


def test_wrong_san_or_foreign_ca_backend_gets_nothing(backend):
    with proxy_for(backend.port, san="spiffe://cluster.local/ns/ran/sa/other") as px:
        assert get(px.port, "/secret").startswith(b"HTTP/1.1 503")
        assert backend.seen == []
    with TlsBackend(ca=OTHER) as foreign, proxy_for(foreign.port) as px:
        assert get(px.port, "/secret").startswith(b"HTTP/1.1 503")
        assert foreign.seen == []


@pytest.mark.parametrize(
    ("now", "ttl_s"),
    [(NOW - dt.timedelta(hours=2), 600), (NOW + dt.timedelta(hours=2), 3600)],
    ids=["expired", "future"],
)
def test_expired_or_not_yet_valid_backend_gets_nothing(now, ttl_s):
    with TlsBackend(now=now, ttl_s=ttl_s) as stale, proxy_for(stale.port) as px:
        assert get(px.port, "/stale").startswith(b"HTTP/1.1 503")
        assert stale.seen == []


def test_h2_client_to_a_tls_cluster_is_served_over_mtls(backend):
    """Before: 503 (no TLS origination for h2 clients). Now the h2 client's request goes over the same mTLS
    HTTP/1.1 upstream as an HTTP/1.1 client's, with our identity and the SNI; never in plaintext."""
    with proxy_for(backend.port) as px:
        url = f"http://127.0.0.1:{px.port}/h2"
        args = ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"]
        out = subprocess.run([*args, url], capture_output=True, text=True, check=False)
        assert out.stdout == "200", out
        assert [p for _, p, _ in backend.seen] == ["/h2"]
        assert backend.sni == ["udm.ran.svc"] and backend.clients == [[str(PROXY_ID)]]
    with proxy_for(backend.port, san="spiffe://cluster.local/ns/ran/sa/other") as px:
        out = subprocess.run([*args, f"http://127.0.0.1:{px.port}/h2-wrong-san"], capture_output=True, text=True,
                             check=False)  # fmt: skip
        assert out.stdout == "503" and [p for _, p, _ in backend.seen] == ["/h2"]


def test_transport_socket_matches_mtls_to_labelled_endpoints_plaintext_to_others(backend):
    """Istio's auto-mTLS shape: an endpoint labelled tlsMode=istio is reached over mTLS, an unlabelled one in
    plaintext, within one cluster (round robin over both)."""
    from planemesh.model.config import Endpoint
    from planemesh.model.tls_config import TlsMatch

    with Backend() as plain:
        sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
        base = make_snapshot(sock.getsockname()[1], [("127.0.0.1", backend.port)])
        mine = ROOT.issue(PROXY_ID, now=NOW)
        tls = TlsContext(cert="default", trust="ROOTCA", san=(SanMatch("uri", exact=str(BACKEND_ID)),))
        eps = (Endpoint("127.0.0.1", backend.port, tls_labels=(("tlsMode", "istio"),), tls_socket=0),
               Endpoint("127.0.0.1", plain.port))  # fmt: skip
        cluster = replace(
            base.clusters["backend"], endpoints=eps, tls_matches=(TlsMatch("istio", (("tlsMode", "istio"),), tls),)
        )
        secrets = {"default": CertSecret(mine.cert_chain_pem(), mine.key_pem()), "ROOTCA": TrustSecret(ROOT.root_pem())}
        snap = replace(base, clusters=MappingProxyType({"backend": cluster}), secrets=MappingProxyType(secrets))
        with ServingProxy(PlaneProxy(snap, PLANE), sock) as px:
            replies = [get(px.port, f"/rr{i}") for i in range(4)]
        assert all(r.startswith(b"HTTP/1.1 200") for r in replies), replies
        assert len(backend.seen) == 2 and len(plain.seen) == 2
        assert backend.clients and all(c == [str(PROXY_ID)] for c in backend.clients)
