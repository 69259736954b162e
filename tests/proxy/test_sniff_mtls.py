"""Istio's inbound mTLS on a sniffed (auto-protocol) port, over real loopback sockets: a client with a
certificate from agent/identity's CA offering istio's ALPN is terminated by the sniffing listener, then what it
sends inside is sniffed: HTTP/1.1 and h2 go through the L7 proxy (routes, identity), raw TCP is relayed in
plaintext to the original destination. A client's own TLS (no istio ALPN) still passes through untouched;
plaintext still goes to the plaintext twin (agent/proxy/sniff_tls.py)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from planemesh.model.config import Cluster, ClusterKind, Endpoint, Listener, ListenerProtocol
from tests.proxy.proxy_harness import PLANE, Backend
from tests.proxy.test_sniff_passthrough import SniffProxy, TcpServer, recv_all
from tests.proxy.test_tcp_tls import Upstream
from tests.proxy.test_tls_termination import AMF, ROOT, TLS, certs, client_ctx, secrets  # noqa: F401 (fixture)

ISTIO_ALPN = ("istio-http/1.0", "istio-http/1.1", "istio-h2", "istio-peer-exchange", "istio")
REQUEST = b"GET /inside HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def mtls_certs(certs: Path) -> Path:  # noqa: F811 (test_tls_termination's client certificates)
    return certs


def sniffed_port(port: int, backend: Backend) -> SniffProxy:
    """virtualInbound's auto-protocol port as xds/translate_capture.py merges it: a sniffed plaintext HTTP
    listener and its sniffed mTLS twin with every TLS chain's ALPN."""
    plain = Listener("inbound-auto", PLANE, port, ListenerProtocol.HTTP, route_config="rc", sniff=True,
                     transport_protocol="raw_buffer")  # fmt: skip
    mtls = Listener("inbound-auto-mtls", PLANE, port, ListenerProtocol.HTTP, route_config="rc", sniff=True, tls=TLS,
                    transport_protocol="tls", application_protocols=ISTIO_ALPN)  # fmt: skip
    clusters = {"backend": Cluster("backend", ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", backend.port),))}
    server = ROOT.issue(AMF, now=ROOT.cert.not_valid_before_utc.replace(microsecond=0))
    px = SniffProxy((plain, mtls), clusters, secrets=secrets(server))
    px.target = ("127.0.0.1", port)  # the original destination: the application's raw TCP side
    return px


def call(px: SniffProxy, ctx: ssl.SSLContext | None, payload: bytes) -> bytes:
    with px.connect() as raw:
        try:
            s = ctx.wrap_socket(raw) if ctx is not None else raw
            s.sendall(payload)
            return recv_all(s)
        except (ssl.SSLError, ConnectionError):
            return b"<refused>"


def h2_get(px: SniffProxy, ctx: ssl.SSLContext) -> int:
    with px.connect() as raw, ctx.wrap_socket(raw) as s:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":path", "/h2"), (":scheme", "http"), (":authority", "app")],
                          end_stream=True)  # fmt: skip
        s.sendall(conn.data_to_send())
        while True:
            data = s.recv(65536)
            assert data, "closed before a response"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    return int(dict(ev.headers)[b":status"])
            s.sendall(conn.data_to_send())


def test_mtls_is_terminated_then_http_and_tcp_are_told_apart_inside(mtls_certs: Path) -> None:
    with Backend() as backend, Upstream() as app:
        with sniffed_port(app.addr[1], backend) as px:
            http = call(px, client_ctx(mtls_certs, alpn=("istio-http/1.1",)), REQUEST)
            tcp = call(px, client_ctx(mtls_certs, alpn=("istio-peer-exchange", "istio")), b"ping")
            status = h2_get(px, client_ctx(mtls_certs, alpn=("istio-h2",)))
        assert http.startswith(b"HTTP/1.1 200") and b"hello /inside" in http  # routed by the L7 proxy
        assert [p for _, p, _ in backend.seen] == ["/inside", "/h2"] and status == 200
        assert tcp == b"echo:ping" and app.seen == [b"ping"]  # decrypted, to the original destination
    stats = px.proxy.sniff_stats
    assert stats.kinds["tls"] == 3 and stats.inner_kinds["http1"] == 1 and stats.inner_kinds["h2"] == 1
    assert stats.inner_kinds["opaque"] == 1
    assert px.proxy.tls_stats.handshakes == 3


def test_a_clients_own_tls_and_plaintext_are_not_terminated(mtls_certs: Path) -> None:
    with Backend() as backend, Upstream() as app:
        with sniffed_port(app.addr[1], backend) as px:
            own = call(px, client_ctx(mtls_certs, alpn=("http/1.1",)), b"ping")  # not istio's ALPN: passed through
            plain = call(px, None, REQUEST)  # the plaintext twin: L7 as before
        assert own == b"<refused>" or not own.startswith(b"echo:ping")
        assert app.seen and app.seen[0][:1] == b"\x16"  # the ClientHello itself reached the application
        assert plain.startswith(b"HTTP/1.1 200") and [p for _, p, _ in backend.seen] == ["/inside"]
    assert px.proxy.tls_stats.handshakes == 0


@pytest.mark.parametrize(("client", "counter"), [("foreign", "peer_cert_refused"), (None, "handshake_failed"),
                                                 ("outsider", "san_refused")])  # fmt: skip
def test_bad_peers_are_refused_before_any_byte_is_sniffed(mtls_certs: Path, client, counter) -> None:
    with Backend() as backend, Upstream() as app:
        with sniffed_port(app.addr[1], backend) as px:
            got = call(px, client_ctx(mtls_certs, client, alpn=("istio-http/1.1",)), REQUEST)
        assert not got.startswith(b"HTTP/1.1 200")
        assert backend.seen == [] and app.seen == []
    assert getattr(px.proxy.tls_stats, counter) == 1


def test_a_silent_peer_inside_tls_is_relayed_after_the_sniff_timeout(mtls_certs: Path) -> None:
    """Server-first protocols inside mTLS: nothing sent, so after the sniff timeout it is opaque TCP."""

    def first(conn: socket.socket) -> None:
        conn.sendall(b"220 hello\r\n")
        conn.sendall(b"bye:" + conn.recv(100))

    with Backend() as backend, TcpServer(first) as app, sniffed_port(app.addr[1], backend) as px:
        ctx = client_ctx(mtls_certs, alpn=("istio-peer-exchange",))
        with px.connect() as raw, ctx.wrap_socket(raw) as s:
            assert s.recv(100) == b"220 hello\r\n"
            s.sendall(b"QUIT")
            assert s.recv(100) == b"bye:QUIT"
    assert px.proxy.sniff_stats.inner_kinds["opaque"] == 1
