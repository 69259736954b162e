"""TLS termination on tcp_proxy chains over real loopback sockets (Istio's mTLS for TCP services): a client
with a certificate from the built-in CA is terminated and its bytes relayed in plaintext to the chain's
upstream; a foreign CA, an expired certificate, no certificate, a wrong SAN, plaintext on a TLS-only port and
a truncated handshake are refused and counted, the upstream never sees them; a permissive port serves both;
network RBAC decides with the client's SPIFFE ID."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from dataclasses import replace
from pathlib import Path

import pytest

from planemesh.agent.proxy.accesslog import AccessLogBuffer
from planemesh.model.config import Cluster, ClusterKind, Endpoint, Listener, ListenerProtocol, WeightedCluster
from planemesh.model.tls_config import SanMatch
from tests.proxy.proxy_harness import PLANE
from tests.proxy.test_sniff_passthrough import SniffProxy, TcpServer, recv_all
from tests.proxy.test_tcp_rbac import network_rbac
from tests.proxy.test_tls_termination import AMF, ROOT, TLS, certs, client_ctx, secrets  # noqa: F401 (fixture)

PORT = 15433  # the chains' destination port (the sniffer's `target` plays the original destination)


class Upstream(TcpServer):
    """A plaintext echo server that records what it read."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        super().__init__(self._echo)

    def _echo(self, conn: socket.socket) -> None:
        data = conn.recv(100)
        self.seen.append(data)
        conn.sendall(b"echo:" + data)


@pytest.fixture(scope="module")
def tls_certs(certs: Path) -> Path:  # noqa: F811 (test_tls_termination's client certificates)
    return certs


def chains(upstream_port: int, *, permissive: bool = False, tls=TLS, rbac=()) -> tuple[tuple, dict]:
    tcp = Listener("db-tls", PLANE, PORT, ListenerProtocol.TCP, tcp_clusters=(WeightedCluster("db", 1),), tls=tls,
                   transport_protocol="tls" if permissive else "", network_rbac=rbac)  # fmt: skip
    listeners = (tcp,)
    if permissive:
        listeners += (replace(tcp, name="db-plain", tls=None, transport_protocol="raw_buffer"),)
    clusters = {"db": Cluster("db", ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", upstream_port),))}
    return listeners, clusters


def tls_call(sniffer: SniffProxy, ctx: ssl.SSLContext | None) -> bytes:
    with sniffer.connect() as raw:
        try:
            s = ctx.wrap_socket(raw) if ctx is not None else raw
            s.sendall(b"ping")
            return recv_all(s)
        except (ssl.SSLError, ConnectionError):
            return b"<refused>"


def serve(upstream: Upstream, listeners=None, clusters=None, **kw) -> SniffProxy:
    if listeners is None:
        listeners, clusters = chains(upstream.addr[1], **kw)
    server = ROOT.issue(AMF, now=ROOT.cert.not_valid_before_utc.replace(microsecond=0))
    px = SniffProxy(listeners, clusters, secrets=secrets(server))
    px.target = ("127.0.0.1", PORT)
    return px


def test_mtls_is_terminated_and_relayed_in_plaintext(tls_certs: Path) -> None:
    lines: list[str] = []
    with Upstream() as upstream, serve(upstream) as px:
        px.proxy.log = AccessLogBuffer(lines.append)
        assert tls_call(px, client_ctx(tls_certs)) == b"echo:ping"
        assert tls_call(px, client_ctx(tls_certs)) == b"echo:ping"
        deadline = time.monotonic() + 5  # the proxy logs once it has seen both ends close
        while px.proxy.sniff_stats.passthrough_active and time.monotonic() < deadline:
            time.sleep(0.05)
    px.proxy.log.flush()
    assert upstream.seen == [b"ping", b"ping"]  # plaintext upstream
    assert px.proxy.tls_stats.handshakes == 2 and px.proxy.sniff_stats.passthrough_total == 2
    logged = "".join(lines).splitlines()
    assert len(logged) == 2, logged  # one access-log line per relayed connection, with the client's identity
    assert all(' "- - TCP" 0 - 4 9 ' in line and line.endswith(f' "{AMF}"') for line in logged), logged


@pytest.mark.parametrize(
    ("client", "counter"),
    [("foreign", "peer_cert_refused"), ("expired", "peer_cert_refused"), (None, "handshake_failed"),
     ("outsider", "san_refused")],
)  # fmt: skip
def test_bad_client_certificates_are_refused(tls_certs: Path, client, counter) -> None:
    with Upstream() as upstream, serve(upstream) as px:
        assert tls_call(px, client_ctx(tls_certs, client)) in (b"", b"<refused>")
        assert tls_call(px, client_ctx(tls_certs)) == b"echo:ping"  # others unaffected
    assert upstream.seen == [b"ping"]
    assert getattr(px.proxy.tls_stats, counter) == 1


def test_not_yet_valid_client_certificate_is_refused(tls_certs: Path, tmp_path: Path) -> None:
    from planemesh.agent.identity.ca import key_pem

    future = ROOT.issue(AMF, now=ROOT.cert.not_valid_before_utc + dt.timedelta(hours=2))
    (tmp_path / "f.pem").write_bytes(future.cert_chain_pem())
    (tmp_path / "f.key").write_bytes(key_pem(future.key))
    ctx = client_ctx(tls_certs, None)
    ctx.load_cert_chain(tmp_path / "f.pem", tmp_path / "f.key")
    with Upstream() as upstream, serve(upstream) as px:
        assert tls_call(px, ctx) in (b"", b"<refused>")
    assert upstream.seen == [] and px.proxy.tls_stats.peer_cert_refused == 1


def test_plaintext_on_tls_only_port_and_truncated_handshake_are_refused(tls_certs: Path) -> None:
    with Upstream() as upstream, serve(upstream) as px:
        assert tls_call(px, None) in (b"", b"<refused>")
        with px.connect() as raw:  # a ClientHello cut short, then the client goes away
            raw.sendall(bytes.fromhex("160301020001"))
        assert tls_call(px, client_ctx(tls_certs)) == b"echo:ping"
    assert upstream.seen == [b"ping"]
    stats = px.proxy.tls_stats  # the cut ClientHello is not a whole TLS record: refused as not TLS, or mid-handshake
    assert stats.plaintext_refused >= 1 and stats.plaintext_refused + stats.handshake_failed == 2


def test_permissive_port_serves_tls_and_plaintext(tls_certs: Path) -> None:
    with Upstream() as upstream, serve(upstream, permissive=True) as px:
        assert tls_call(px, client_ctx(tls_certs)) == b"echo:ping"
        assert tls_call(px, None) == b"echo:ping"
    assert upstream.seen == [b"ping", b"ping"]
    assert px.proxy.sniff_stats.routed == {"db-tls": {"(none)": 1}, "db-plain": {"(none)": 1}}


def test_network_rbac_decides_with_the_client_spiffe_id(tls_certs: Path) -> None:
    rules = {"action": "ALLOW", "policies": {"amf-only": {"permissions": [{"destination_port": PORT}],
             "principals": [{"authenticated": {"principal_name": {"exact": str(AMF)}}}]}}}  # fmt: skip
    open_tls = replace(TLS, san=(SanMatch("uri", prefix="spiffe://cluster.local/"),))
    with Upstream() as upstream, serve(upstream, tls=open_tls, rbac=network_rbac(rules)) as px:
        assert tls_call(px, client_ctx(tls_certs)) == b"echo:ping"
        assert tls_call(px, client_ctx(tls_certs, "outsider")) in (b"", b"<refused>")
    assert upstream.seen == [b"ping"]
    assert px.proxy.tls_stats.rbac_denied == 1 and px.proxy.tls_stats.san_refused == 0
