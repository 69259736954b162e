"""The sniffing listener over real loopback sockets: HTTP/1.1 goes through the L7 proxy, TLS and opaque
protocols are passed through byte-exact with half-close, server-first protocols after the sniff timeout."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest

from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.labs.protocol_servers import self_signed_cert
from planemesh.model.config import Cluster, ClusterKind, Endpoint, Listener, ListenerProtocol, WeightedCluster
from tests.proxy.proxy_harness import PLANE, Backend, ServingProxy, free_port, make_snapshot

SNIFF_TIMEOUT_S = 0.15


class SniffProxy(ServingProxy):
    """A PlaneProxy with only a sniffing listener on 127.0.0.1; `target` plays the original destination
    (a transparent socket would report it as getsockname())."""

    drain_s = 0.2

    def __init__(
        self, listeners: tuple[Listener, ...] = (), clusters: dict[str, Cluster] | None = None, secrets=None, sla=None
    ) -> None:
        sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
        self.target: tuple[str, int] = ("127.0.0.1", 9)
        snap = make_snapshot(free_port(), [], clusters=clusters, sla=sla)
        snap = replace(
            snap,
            planes=(replace(snap.planes[0], sniff_port=sock.getsockname()[1]),),
            listeners=snap.listeners + listeners,
            secrets=MappingProxyType(dict(secrets or {})),
        )
        proxy = PlaneProxy(
            snap,
            PLANE,
            tick_s=0.05,
            sniff_timeout_s=SNIFF_TIMEOUT_S,
            original_destination=lambda sockname, peer: self.target,
        )
        super().__init__(proxy, sock)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)


class TcpServer:
    """A one-thread-per-connection TCP server on 127.0.0.1 running `handler(conn)`."""

    def __init__(self, handler: Callable[[socket.socket], None], wrap: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.wrap = wrap
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.2)
        self.addr = self.lsock.getsockname()
        self.stop = False
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            if self.wrap is not None:
                conn = self.wrap.wrap_socket(conn, server_side=True)
            self.handler(conn)
        except BaseException as exc:  # reported by the test through self.errors
            self.errors.append(exc)
        finally:
            conn.close()

    def __enter__(self) -> TcpServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop = True
        self.thread.join(timeout=2)
        self.lsock.close()


def recv_all(sock: socket.socket, limit: int = 64 << 20) -> bytes:
    out = bytearray()
    while len(out) < limit:
        data = sock.recv(65536)
        if not data:
            break
        out += data
    return bytes(out)


@pytest.fixture
def sniffer() -> Iterator[SniffProxy]:
    with SniffProxy() as proxy:
        yield proxy


def test_http1_on_undeclared_port_is_proxied(sniffer: SniffProxy) -> None:
    with Backend() as backend:
        sniffer.target = ("127.0.0.1", backend.port)
        with sniffer.connect() as s:
            s.sendall(b"GET /sniffed HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
            reply = recv_all(s)
        assert reply.startswith(b"HTTP/1.1 200")
        method, path, headers = backend.seen[-1]
        assert (method, path) == ("GET", "/sniffed")
        assert "x-request-id" in headers  # went through the L7 proxy, not passed through
    assert sniffer.proxy.sniff_stats.kinds["http1"] == 1


def _reverse_after_eof(conn: socket.socket) -> None:
    data = recv_all(conn)  # until the client's half-close
    conn.sendall(hashlib.sha256(data).digest() + data[::-1])


def test_binary_protocol_is_byte_exact_with_half_close(sniffer: SniffProxy) -> None:
    payload = os.urandom(3 << 20) + b"\x00\xff" * 1000
    with TcpServer(_reverse_after_eof) as server:
        sniffer.target = server.addr
        with sniffer.connect() as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)  # half-close: the reply must still arrive
            reply = recv_all(s)
        assert not server.errors
    assert reply[:32] == hashlib.sha256(payload).digest()
    assert reply[32:] == payload[::-1]
    stats = sniffer.proxy.sniff_stats
    assert stats.kinds["opaque"] == 1
    assert stats.bytes_up == len(payload) and stats.bytes_down == len(reply)


def _banner_then_echo(conn: socket.socket) -> None:
    conn.sendall(b"220 mail.test ESMTP ready\r\n")
    while data := conn.recv(4096):
        conn.sendall(b"250 " + data)


def test_server_first_protocol_after_the_timeout(sniffer: SniffProxy) -> None:
    with TcpServer(_banner_then_echo) as server:
        sniffer.target = server.addr
        t0 = time.monotonic()
        with sniffer.connect() as s:
            banner = s.recv(100)
            waited = time.monotonic() - t0
            s.sendall(b"EHLO client\r\n")
            assert s.recv(100) == b"250 EHLO client\r\n"
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b""
    assert banner == b"220 mail.test ESMTP ready\r\n"
    assert SNIFF_TIMEOUT_S * 0.9 <= waited < SNIFF_TIMEOUT_S + 1.0
    assert sniffer.proxy.sniff_stats.silent_clients == 1


def test_tls_is_passed_through_untouched_and_sni_counted(sniffer: SniffProxy, tmp_path: Path) -> None:
    cert, key, der = self_signed_cert(tmp_path, "secure.test")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.set_alpn_protocols(["h2", "http/1.1"])

    def echo(conn: socket.socket) -> None:
        conn.sendall(b"hello over tls:" + conn.recv(100))

    with TcpServer(echo, wrap=server_ctx) as server:
        sniffer.target = server.addr
        client_ctx = ssl.create_default_context(cafile=str(cert))  # verifies: only the real server's cert passes
        client_ctx.set_alpn_protocols(["h2", "http/1.1"])
        with sniffer.connect() as raw, client_ctx.wrap_socket(raw, server_hostname="secure.test") as s:
            assert s.getpeercert(binary_form=True) == der
            assert s.selected_alpn_protocol() == "h2"
            s.sendall(b"ping")
            assert s.recv(100) == b"hello over tls:ping"
    stats = sniffer.proxy.sniff_stats
    assert stats.kinds["tls"] == 1
    assert stats.sni == {"secure.test": 1}
    assert stats.alpn == {"h2": 1, "http/1.1": 1}


def test_unreachable_destination_resets_the_client(sniffer: SniffProxy) -> None:
    sniffer.target = ("127.0.0.1", free_port())  # nothing listens there
    with sniffer.connect() as s:
        s.sendall(b"\x01\x02binary")
        with pytest.raises(ConnectionResetError):
            recv_all(s)
    assert sniffer.proxy.sniff_stats.connect_failures == 1


def _tls_server(tmp: Path, name: str, reply: bytes) -> tuple[TcpServer, Path, bytes]:
    """A TLS server with its own self-signed certificate for `name`, answering `reply + what it read`."""
    cert, key, der = self_signed_cert(tmp, name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    def answer(conn: socket.socket) -> None:
        conn.sendall(reply + conn.recv(100))

    return TcpServer(answer, wrap=ctx), cert, der


def _tls_call(sniffer: SniffProxy, sni: str, cafile: Path) -> tuple[bytes, bytes]:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with sniffer.connect() as raw, ctx.wrap_socket(raw, server_hostname=sni) as s:
        s.sendall(b"ping")
        return s.getpeercert(binary_form=True), s.recv(100)  # type: ignore[return-value]


def test_tls_is_routed_by_sni_to_the_chain_cluster(tmp_path: Path) -> None:
    routed, routed_cert, routed_der = _tls_server(tmp_path / "a", "svc.a.test", b"A:")
    original, original_cert, original_der = _tls_server(tmp_path / "b", "b.test", b"B:")
    with routed, original:
        port = original.addr[1]  # the chains are on the original destination's port
        listeners = (
            Listener("to-a", PLANE, port, ListenerProtocol.TCP, server_names=("*.a.test",),
                     tcp_clusters=(WeightedCluster("tls-a", 1),)),
            Listener("dead", PLANE, port, ListenerProtocol.TCP, server_names=("dead.test",),
                     tcp_clusters=(WeightedCluster("no-endpoints", 1),)),
        )  # fmt: skip
        clusters = {
            "tls-a": Cluster("tls-a", ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", routed.addr[1]),)),
            "no-endpoints": Cluster("no-endpoints", ClusterKind.EDS),
        }
        with SniffProxy(listeners, clusters) as sniffer:
            sniffer.target = original.addr
            # The SNI picks the chain; the certificate is the routed server's own (nothing terminated TLS).
            assert _tls_call(sniffer, "svc.a.test", routed_cert) == (routed_der, b"A:ping")
            assert _tls_call(sniffer, "b.test", original_cert) == (original_der, b"B:ping")  # no chain: original
            with sniffer.connect() as raw, pytest.raises((ssl.SSLError, ConnectionResetError)):
                ssl.create_default_context(cafile=str(original_cert)).wrap_socket(raw, server_hostname="dead.test")
        assert not routed.errors and not original.errors
    stats = sniffer.proxy.sniff_stats
    assert stats.routed == {"to-a": {"svc.a.test": 1}, "dead": {"dead.test": 1}}
    assert stats.sni == {"svc.a.test": 1, "b.test": 1, "dead.test": 1}
    assert stats.no_upstream == 1 and stats.passthrough_total == 2


def test_http_on_a_tcp_proxy_port_is_passed_through_not_proxied() -> None:
    """A port some tcp_proxy chain owns is sniffed for its SNI only: HTTP there stays opaque bytes."""
    with Backend() as backend:
        listeners = (
            Listener("tls-only", PLANE, backend.port, ListenerProtocol.TCP, server_names=("x.test",)),
            Listener("rest", PLANE, backend.port, ListenerProtocol.TCP),
        )
        with SniffProxy(listeners) as sniffer:
            sniffer.target = ("127.0.0.1", backend.port)
            with sniffer.connect() as s:
                s.sendall(b"GET /raw HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
                assert recv_all(s).startswith(b"HTTP/1.1 200")
        method, path, headers = backend.seen[-1]
        assert (method, path) == ("GET", "/raw") and "x-request-id" not in headers
    stats = sniffer.proxy.sniff_stats
    assert stats.kinds["http1"] == 1 and stats.passthrough_total == 1
    assert stats.routed == {"rest": {"(none)": 1}}
