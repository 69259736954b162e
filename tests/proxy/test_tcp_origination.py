"""TLS origination on relayed TCP over real loopback sockets (Istio auto-mTLS for tcp_proxy chains): a chain
relayed by the sniffing listener to its cluster reaches an endpoint labelled `tlsMode: istio` over mTLS (a real
TLS server requiring a client certificate from the built-in CA), with the proxy's SPIFFE certificate, the SNI and
ALPN of the match, the server's SAN checked; an unlabelled endpoint stays plaintext. A server with the wrong SAN,
from another CA or with an expired certificate gets nothing: counted, logged, the client closed. Half-close
(the client's FIN -> close_notify, the answer still relayed) and back-pressure (megabytes both ways) hold over
TLS. On an auto-protocol port (an HTTP chain and a TCP chain on one destination) the bytes that are not HTTP go
to the TCP chain's cluster, HTTP to the routes. Before this, every relayed connection was plaintext and the
auto-protocol port's non-HTTP bytes went to the original destination."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509

from planemesh.agent.identity.ca import spiffe_ids
from planemesh.model.config import (
    Cluster,
    ClusterKind,
    Endpoint,
    Listener,
    ListenerProtocol,
    WeightedCluster,
)
from planemesh.model.tls_config import CertSecret, SanMatch, TlsContext, TlsMatch, TrustSecret
from tests.proxy.proxy_harness import PLANE, Backend
from tests.proxy.test_sniff_passthrough import SniffProxy, TcpServer, recv_all
from tests.proxy.test_tls_origination import BACKEND_ID, NOW, OTHER, PROXY_ID, ROOT, mtls_server_context

PORT = 15444  # the chain's destination port (the sniffer's `target` plays the original destination)
ISTIO = (("tlsMode", "istio"),)
SNI = "outbound_.5000_._.db.ran.svc.cluster.local"
MTLS = TlsContext(cert="default", trust="ROOTCA", san=(SanMatch("uri", exact=str(BACKEND_ID)),), sni=SNI,
                  alpn=("istio-peer-exchange", "istio"))  # fmt: skip


class MtlsEcho(TcpServer):
    """A TLS server requiring a client certificate from ROOT: reads until the client's EOF (its close_notify),
    then answers `echo:` + the SHA-256 of what it read, and the length (half-close over TLS)."""

    def __init__(self, ca=ROOT, now=NOW, ttl_s: float = 3600, who=BACKEND_ID) -> None:
        ctx, self.tmp = mtls_server_context(ca, who, now, ttl_s)
        ctx.set_alpn_protocols(["istio"])
        self.sni: list[str | None] = []
        ctx.sni_callback = lambda obj, name, _ctx: self.sni.append(name)
        self.clients: list[list[str]] = []
        self.alpn: list[str | None] = []
        self.seen: list[bytes] = []
        super().__init__(self._serve_one, wrap=ctx)

    def _serve_one(self, conn: socket.socket) -> None:
        self.clients.append(spiffe_ids(x509.load_der_x509_certificate(conn.getpeercert(binary_form=True))))
        self.alpn.append(conn.selected_alpn_protocol())
        got = recv_all(conn)
        self.seen.append(got[:64])
        conn.sendall(b"echo:%s:%d" % (hashlib.sha256(got).hexdigest().encode(), len(got)))


class PlainEcho(TcpServer):
    def __init__(self) -> None:
        self.seen: list[bytes] = []
        super().__init__(self._serve_one)

    def _serve_one(self, conn: socket.socket) -> None:
        got = recv_all(conn)
        self.seen.append(got[:64])
        conn.sendall(b"plain:%d" % len(got))


def db_cluster(*endpoints: tuple[int, bool], kind: ClusterKind = ClusterKind.STATIC) -> Cluster:
    """istiod's outbound cluster shape: a `tlsMode: istio` match (mTLS) before the plaintext default."""
    eps = tuple(Endpoint("127.0.0.1", port, tls_labels=ISTIO if istio else (), tls_socket=0 if istio else -1)
                for port, istio in endpoints)  # fmt: skip
    return Cluster("db", kind, endpoints=eps, connect_timeout_s=2.0,
                   tls_matches=(TlsMatch("tlsMode-istio", ISTIO, MTLS),))  # fmt: skip


def secrets() -> dict:
    mine = ROOT.issue(PROXY_ID, now=NOW)
    return {"default": CertSecret(mine.cert_chain_pem(), mine.key_pem()), "ROOTCA": TrustSecret(ROOT.root_pem())}


def relay(cluster: Cluster, listener: Listener | None = None, clusters: dict | None = None) -> SniffProxy:
    lsn = listener or Listener("db", PLANE, PORT, ListenerProtocol.TCP, tcp_clusters=(WeightedCluster("db", 1),))
    px = SniffProxy((lsn,), {"db": cluster, **(clusters or {})}, secrets=secrets())
    px.target = ("127.0.0.1", PORT)  # nothing listens there: only the cluster's endpoint answers
    return px


def call(px: SniffProxy, payload: bytes = b"ping", half_close: bool = True) -> bytes:
    """Send, half-close, read the answer until the proxy closes."""
    with px.connect() as s:
        s.settimeout(10)
        try:
            s.sendall(payload)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            return recv_all(s)
        except ConnectionError:
            return b"<reset>"


def answer(payload: bytes) -> bytes:
    return b"echo:%s:%d" % (hashlib.sha256(payload).hexdigest().encode(), len(payload))


def settle(px: SniffProxy) -> None:
    deadline = time.monotonic() + 5
    while px.proxy.sniff_stats.passthrough_active and time.monotonic() < deadline:
        time.sleep(0.02)


def test_mtls_to_istio_endpoint_with_our_identity_sni_alpn_and_half_close() -> None:
    with MtlsEcho() as server, relay(db_cluster((server.addr[1], True))) as px:
        assert call(px) == answer(b"ping")  # the answer comes after our close_notify: half-close over TLS
        assert call(px, b"pong") == answer(b"pong")
    assert server.seen == [b"ping", b"pong"] and not server.errors
    assert server.clients == [[str(PROXY_ID)]] * 2 and server.sni == [SNI] * 2 and server.alpn == ["istio"] * 2
    origin = px.proxy.sniff_stats.origin
    assert (origin.handshakes, origin.failed) == (2, 0)


def test_megabytes_both_ways_keep_back_pressure() -> None:
    """8 MiB up and the echo server's whole answer: nothing lost, no deadlock, over TLS."""
    payload = os.urandom(8 << 20)
    with MtlsEcho() as server, relay(db_cluster((server.addr[1], True))) as px:
        assert call(px, payload) == answer(payload)
        settle(px)
        assert px.proxy.sniff_stats.bytes_up == len(payload)


def test_server_streams_while_client_still_sends() -> None:
    """Both directions at once through the TLS relay: the server echoes every chunk as it comes."""

    def echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    srv = MtlsEcho()
    srv.handler = echo
    with srv as server, relay(db_cluster((server.addr[1], True))) as px, px.connect() as s:
        s.settimeout(10)
        chunk = os.urandom(256 << 10)
        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(recv_all(s)), daemon=True)
        reader.start()
        for _ in range(16):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        reader.join(15)
        assert bytes(got) == chunk * 16


@pytest.mark.parametrize(
    ("kw", "counter"),
    [({"who": PROXY_ID}, "san_refused"), ({"ca": OTHER}, "failed"),
     ({"now": NOW.replace(year=NOW.year - 1), "ttl_s": 600}, "failed"),
     ({"now": NOW + dt.timedelta(hours=2)}, "failed"), (None, "timeouts")],
    ids=["wrong-san", "foreign-ca", "expired", "not-yet-valid", "plaintext-server"],
)  # fmt: skip
def test_refused_server_gets_nothing_and_is_counted(kw, counter, caplog) -> None:
    """A plaintext server behind a tlsMode istio endpoint never answers the ClientHello: the handshake times out
    (the cluster's 2 s connect timeout)."""
    caplog.set_level(logging.INFO, "planemesh.proxy.tls")
    with (MtlsEcho(**kw) if kw is not None else PlainEcho()) as bad, relay(db_cluster((bad.addr[1], True))) as px:
        assert call(px, b"secret") in (b"", b"<reset>")
        settle(px)
        stats = px.proxy.sniff_stats
        assert getattr(stats.origin, counter) == 1 and stats.origin.failed == 1 and stats.origin.handshakes == 0
        assert stats.connect_failures == 1
    assert not any(b"secret" in seen for seen in bad.seen)  # never a byte of the client's (a ClientHello at most)
    assert "upstream" in caplog.text  # logged with the reason


def test_plaintext_endpoint_stays_plaintext_in_the_same_cluster() -> None:
    """tlsMode-disabled endpoints (no label) are reached in plaintext; labelled ones over mTLS (round robin)."""
    with MtlsEcho() as server, PlainEcho() as plain, relay(db_cluster((server.addr[1], True), (plain.addr[1], False))) as px:  # noqa: E501
        answers = sorted(call(px, b"x%d" % i) for i in range(4))
    assert sum(a.startswith(b"echo:") for a in answers) == 2 and answers.count(b"plain:2") == 2, answers
    assert len(server.seen) == 2 and len(plain.seen) == 2 and plain.seen[0].startswith(b"x")
    assert px.proxy.sniff_stats.origin.handshakes == 2


def test_auto_protocol_port_relays_non_http_to_the_tcp_chains_cluster() -> None:
    """An HTTP chain with a TCP chain behind it (one sniffed listener carrying the TCP chain's cluster, as
    xds/translate_capture.py makes istiod's auto-protocol port): HTTP goes to the routes, other bytes over mTLS
    to the TCP chain's cluster. Before, they went to the original destination (here: a plaintext server)."""
    with Backend() as web, MtlsEcho() as server, PlainEcho() as original:
        web_cluster = Cluster("backend", ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", web.port),))
        auto = Listener("auto", PLANE, original.addr[1], ListenerProtocol.HTTP, route_config="rc", sniff=True,
                        tcp_clusters=(WeightedCluster("db", 1),))  # fmt: skip
        with relay(db_cluster((server.addr[1], True)), auto, {"backend": web_cluster}) as px:
            px.target = original.addr
            assert call(px, b"\x00\x01binary protocol") == answer(b"\x00\x01binary protocol")
            reply = call(px, b"GET /page HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n", half_close=False)
            assert reply.startswith(b"HTTP/1.1 200"), reply
    assert server.seen == [b"\x00\x01binary protocol"] and original.seen == []
    assert [p for _, p, _ in web.seen] == ["/page"]


def test_auto_protocol_port_keeps_the_original_destination_for_a_passthrough_cluster() -> None:
    """The TCP chain's cluster would pick the original destination (ORIGINAL_DST, no TLS): it is used."""
    with PlainEcho() as original:
        auto = Listener("auto", PLANE, original.addr[1], ListenerProtocol.HTTP, route_config="rc", sniff=True,
                        tcp_clusters=(WeightedCluster("pass", 1),))  # fmt: skip
        with relay(Cluster("db"), auto, {"pass": Cluster("pass", ClusterKind.ORIGINAL_DST)}) as px:
            px.target = original.addr
            assert call(px, b"\x00opaque") == b"plain:7"
    assert original.seen == [b"\x00opaque"]


def test_istio_tcp_metrics_carry_our_identity_and_the_servers() -> None:
    """istio_tcp_* of an originated mTLS connection: source = our SPIFFE ID, destination = the identity the
    cluster required of the server (before: unknown, as for plaintext)."""
    name = "outbound|5000||db.ran.svc.cluster.local"
    with MtlsEcho() as server:
        cluster = replace(db_cluster((server.addr[1], True)), name=name)
        lsn = Listener("db", PLANE, PORT, ListenerProtocol.TCP, tcp_clusters=(WeightedCluster(name, 1),))
        with relay(cluster, lsn, {name: cluster}) as px:
            assert call(px) == answer(b"ping")
            settle(px)
            rows = [r for r in px.proxy.istio.report(PLANE) if r["cluster"] == name]
    assert [(r["source_principal"], r["destination_principal"], r["tcp_opened"]) for r in rows] == [
        (str(PROXY_ID), str(BACKEND_ID), 1)
    ], rows


def test_sessions_are_resumed_and_the_san_still_checked() -> None:
    """Later connections to the same server resume the session (as Envoy's upstream TLS does by default); a
    resumed session still carries the server's certificate, so the SAN check passes on it (an empty SAN list
    would refuse the connection) and the server still sees our certificate."""
    with MtlsEcho() as server, relay(db_cluster((server.addr[1], True))) as px:
        answers = [call(px, b"r%d" % i) for i in range(4)]
    assert answers == [answer(b"r%d" % i) for i in range(4)]
    origin = px.proxy.sniff_stats.origin
    assert origin.handshakes == 4 and origin.resumed >= 2 and origin.failed == 0, origin.as_dict()
    assert server.clients == [[str(PROXY_ID)]] * 4


class BannerFirst(TcpServer):
    """A TLS server (pyOpenSSL, our client certificate required) that sends a banner, ends its side (close_notify
    and FIN), and still reads what the client sends until the client's close_notify or FIN."""

    def __init__(self) -> None:
        from OpenSSL import SSL

        issued = ROOT.issue(BACKEND_ID, now=NOW)
        self.ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.ctx.use_certificate(x509.load_pem_x509_certificate(issued.cert_chain_pem()))
        self.ctx.use_privatekey(issued.key)
        self.ctx.load_verify_locations(str(self.pem(ROOT.root_pem())))
        self.ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *_: True)
        self.seen: list[bytes] = []
        super().__init__(self._serve_one)

    @staticmethod
    def pem(data: bytes) -> Path:
        path = Path(tempfile.mkdtemp()) / "root.pem"
        path.write_bytes(data)
        return path

    def _serve_one(self, raw: socket.socket) -> None:
        from OpenSSL import SSL

        raw.settimeout(None)  # pyOpenSSL on a socket with a timeout raises WantRead instead of waiting
        conn = SSL.Connection(self.ctx, raw)
        conn.set_accept_state()
        conn.do_handshake()
        conn.sendall(b"220 banner\r\n")
        conn.shutdown()  # our close_notify: the server's side ends here
        raw.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := conn.recv(65536):
                got += chunk
        except (SSL.ZeroReturnError, SSL.SysCallError):
            pass
        self.seen.append(got)


def test_server_half_close_first_keeps_the_clients_direction() -> None:
    """The server's close_notify and FIN reach the client as a FIN (half-close), and what the client sends
    afterwards still reaches the server over TLS, as with a plaintext upstream. Before: the relay ended."""
    with BannerFirst() as server, relay(db_cluster((server.addr[1], True))) as px, px.connect() as s:
        s.settimeout(10)
        assert recv_all(s) == b"220 banner\r\n"  # EOF after the banner: the server's half-close
        s.sendall(b"QUIT after your EOF\r\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b""
        deadline = time.monotonic() + 5
        while not server.seen and time.monotonic() < deadline:
            time.sleep(0.02)
    assert server.seen == [b"QUIT after your EOF\r\n"] and not server.errors


def test_original_dst_cluster_with_tls_originates_to_the_original_destination() -> None:
    """An ORIGINAL_DST cluster's own transport_socket (no endpoints, no matches): TLS to where the client's packet
    was addressed."""
    with MtlsEcho() as server:
        passthrough = Cluster("pass", ClusterKind.ORIGINAL_DST, tls=MTLS)
        lsn = Listener("db", PLANE, server.addr[1], ListenerProtocol.TCP, tcp_clusters=(WeightedCluster("pass", 1),))
        with relay(Cluster("db"), lsn, {"pass": passthrough}) as px:
            px.target = server.addr
            assert call(px) == answer(b"ping")
    assert server.clients == [[str(PROXY_ID)]] and px.proxy.sniff_stats.origin.handshakes == 1
