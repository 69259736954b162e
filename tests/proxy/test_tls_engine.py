"""The TLS engine (agent/tls/engine.py, transport.py): pyOpenSSL over the cryptography wheel's OpenSSL,
sans-IO over memory BIOs, and its asyncio transport over real loopback sockets with real clients (Python's
ssl, i.e. the system OpenSSL): mTLS with ALPN and SANs, a TLS 1.3 server's tickets held until its first write,
reading paused and resumed with records left in the BIO, a failed handshake reported once, a handshake
timeout, and contexts refusing bad material."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from OpenSSL import SSL

from planemesh.agent.tls.engine import (
    TlsConn,
    TlsError,
    TlsPeerView,
    build_engine_context,
)
from planemesh.agent.tls.transport import accept_tls, connect_tls
from planemesh.model.tls_config import CertSecret, TrustSecret
from tests.proxy.test_tls_termination import AMF, GW, NOW, OTHER, ROOT, TLS, certs, client_ctx  # noqa: F401


def _secrets(who=GW, ca=ROOT) -> tuple[CertSecret, TrustSecret]:
    issued = ca.issue(who, now=NOW)
    return CertSecret(issued.cert_chain_pem(), issued.key_pem()), TrustSecret(ROOT.root_pem())


def _pump(client: TlsConn, server: TlsConn) -> None:
    for _ in range(10):
        c_done = client.handshake()
        server.feed(client.outgoing())
        s_done = server.handshake()
        out = server.outgoing()
        if out:
            client.feed(out)
        if c_done and s_done:
            return
    raise AssertionError("no handshake")


def test_sans_io_mtls_alpn_and_peer_facts() -> None:
    cert, trust = _secrets()
    server = TlsConn(build_engine_context(TLS, cert, trust, server=True), server=True)
    amf_cert, _ = _secrets(AMF)
    client_tls = replace(TLS, alpn=("http/1.1", "h2"))
    client = TlsConn(build_engine_context(client_tls, amf_cert, trust, server=False), server=False, sni="gw")
    _pump(client, server)
    assert server.alpn() == "h2"  # the server's order decides (the stdlib's SSL_select_next_proto)
    view = TlsPeerView(server)
    assert view.sans() == ([str(AMF)], [])
    assert view.getpeercert(binary_form=True) == TlsPeerView(server).getpeercert(binary_form=True)
    assert TlsPeerView(client).sans() == ([str(GW)], [])
    client.write(b"ping" * 5000)  # more than one record
    server.feed(client.outgoing())
    got = b""
    while chunk := server.read():
        got += chunk
    assert got == b"ping" * 5000
    client.close_notify()
    server.feed(client.outgoing())
    assert server.read() is None  # close_notify


def test_a_client_from_another_ca_fails_the_handshake() -> None:
    cert, trust = _secrets()
    server = TlsConn(build_engine_context(TLS, cert, trust, server=True), server=True)
    foreign, _ = _secrets(AMF, ca=OTHER)
    client = TlsConn(build_engine_context(TLS, foreign, None, server=False), server=False)
    with pytest.raises(TlsError, match=r"(?i)certificate"):
        _pump(client, server)


def test_contexts_refuse_bad_material() -> None:
    cert, trust = _secrets()
    other, _ = _secrets(AMF)
    with pytest.raises(ValueError):
        build_engine_context(TLS, CertSecret(b"not a pem", cert.key_pem), trust, server=True)
    with pytest.raises(ValueError):  # a key that is not the certificate's
        build_engine_context(TLS, CertSecret(cert.chain_pem, other.key_pem), trust, server=True)


class _Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.got = b""
        self.eof = False

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got += data
        assert self.transport is not None
        self.transport.write(data.upper())

    def eof_received(self) -> None:
        self.eof = True


def _serve(loop: asyncio.AbstractEventLoop, ctx: SSL.Context, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    """A listening socket whose connections get the engine's server handshake; results land in `results`."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    results: list = []

    async def accept_loop() -> None:
        while True:
            conn, _ = await loop.sock_accept(lsock)
            try:
                results.append(await accept_tls(loop, conn, _Echo, ctx, timeout))
            except (TlsError, OSError, TimeoutError) as exc:
                results.append(exc)

    return lsock, results, accept_loop


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _run(loop, coro, timeout=10):  # type: ignore[no-untyped-def]
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def test_transport_with_a_stdlib_client_and_tickets_ride_with_the_first_write(loop, certs: Path) -> None:  # noqa: F811
    cert, trust = _secrets()
    lsock, results, accept_loop = _serve(loop, build_engine_context(TLS, cert, trust, server=True))
    task = asyncio.run_coroutine_threadsafe(accept_loop(), loop)
    try:
        port = lsock.getsockname()[1]
        ctx = client_ctx(certs)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
            s.settimeout(0.3)
            with pytest.raises(TimeoutError):  # nothing after the handshake until the server writes: no ticket
                s.recv(1)
            assert s.session is None or not s.session.has_ticket
            s.settimeout(5)
            s.sendall(b"hello")
            assert s.recv(100) == b"HELLO"
            assert s.session.has_ticket  # the tickets came with the first response
            transport, proto = results[0]
            assert transport.get_extra_info("ssl_object").sans() == ([str(AMF)], [])
            assert proto.got == b"hello"
    finally:
        task.cancel()
        lsock.close()


def test_paused_reading_keeps_records_until_resumed(loop, certs: Path) -> None:  # noqa: F811
    cert, trust = _secrets()
    lsock, results, accept_loop = _serve(loop, build_engine_context(TLS, cert, trust, server=True))
    task = asyncio.run_coroutine_threadsafe(accept_loop(), loop)
    try:
        port = lsock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, client_ctx(certs).wrap_socket(raw) as s:
            s.sendall(b"a")
            assert s.recv(10) == b"A"
            transport, proto = results[0]
            _run(loop, _call(transport.pause_reading))
            s.sendall(b"bcd")
            _run(loop, asyncio.sleep(0.3))
            assert proto.got == b"a"  # paused: nothing delivered
            _run(loop, _call(transport.resume_reading))
            assert s.recv(10) == b"BCD"
            assert proto.got == b"abcd"
            _run(loop, _call(transport.pause_reading))
            s.sendall(b"ef")
            s.shutdown(socket.SHUT_WR)  # the client's EOF while paused: its last records are not lost
            _run(loop, asyncio.sleep(0.3))
            _run(loop, _call(transport.resume_reading))
            _run(loop, asyncio.sleep(0.3))
            assert proto.got == b"abcdef" and proto.eof
    finally:
        task.cancel()
        lsock.close()


async def _call(fn):  # type: ignore[no-untyped-def]
    return fn()


def test_handshake_timeout_and_refused_client_are_reported(loop, certs: Path) -> None:  # noqa: F811
    cert, trust = _secrets()
    lsock, results, accept_loop = _serve(loop, build_engine_context(TLS, cert, trust, server=True), timeout=0.5)
    task = asyncio.run_coroutine_threadsafe(accept_loop(), loop)
    try:
        port = lsock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"\x16\x03\x01")  # a ClientHello that never finishes
            assert raw.recv(10) == b""  # closed by the server after the timeout
        assert isinstance(results[0], TimeoutError)
        no_cert = client_ctx(certs, name=None)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            pytest.raises((ssl.SSLError, OSError)),
            no_cert.wrap_socket(raw) as s,  # no client certificate
        ):
            s.sendall(b"x")
            s.recv(10)
        _run(loop, asyncio.sleep(0.2))
        assert len(results) == 2 and isinstance(results[1], TlsError)
    finally:
        task.cancel()
        lsock.close()


def test_engine_client_originates_to_a_stdlib_server(loop, certs: Path) -> None:  # noqa: F811
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs / "amf.pem", certs / "amf.key")
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]

    def serve_one() -> None:
        conn, _ = lsock.accept()
        with server.wrap_socket(conn, server_side=True) as s:
            s.sendall(s.recv(10)[::-1])

    threading.Thread(target=serve_one, daemon=True).start()
    _, trust = _secrets()

    async def client() -> bytes:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        ctx = build_engine_context(replace(TLS, cert=""), None, trust, server=False)
        transport, proto = await connect_tls(asyncio.get_running_loop(), sock, _Collect, ctx, "amf", 5)
        assert transport.get_extra_info("ssl_object").sans() == ([str(AMF)], [])
        transport.write(b"abc")
        for _ in range(50):
            if proto.got:
                break
            await asyncio.sleep(0.05)
        transport.close()
        return proto.got

    try:
        assert _run(loop, client()) == b"cba"
    finally:
        lsock.close()


class _Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.got = b""

    def data_received(self, data: bytes) -> None:
        self.got += data


def test_a_worker_without_tls_does_not_load_the_engine() -> None:
    """pyOpenSSL and the cryptography wheel (~13 MB of RSS) load with the first TLS context, not with the proxy."""
    code = (
        "import sys, planemesh.agent.proxy.server, planemesh.agent.proxy.passthrough\n"
        "print(sorted(m for m in ('OpenSSL', 'cryptography') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


class _Pausing(asyncio.Protocol):
    """Records each data_received and pauses reading on the first one."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.calls: list[int] = []
        self.eof = False

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.calls:
            assert self.transport is not None
            self.transport.pause_reading()
        self.calls.append(len(data))

    def eof_received(self) -> None:
        self.eof = True


def test_records_of_one_read_are_one_data_received_and_a_close_notify_waits_for_resume(loop) -> None:
    cert, trust = _secrets()
    amf, _ = _secrets(AMF)
    server_ctx = build_engine_context(TLS, cert, trust, server=True)
    client_ctx_ = build_engine_context(TLS, amf, trust, server=False)
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)

    async def scenario() -> _Pausing:
        accepted = asyncio.ensure_future(loop.sock_accept(lsock))
        raw = socket.create_connection(lsock.getsockname())
        raw.setblocking(False)
        conn, _ = await accepted
        server_side = asyncio.ensure_future(accept_tls(loop, conn, _Pausing, server_ctx, 5))
        transport, _ = await connect_tls(loop, raw, asyncio.Protocol, client_ctx_, None, 5)
        _, proto = await server_side
        transport.write(b"r" * 40000)  # three records, one TCP write
        transport.close()  # then close_notify
        await asyncio.sleep(0.3)
        return proto

    try:
        proto = _run(loop, scenario())
        assert proto.calls == [40000]  # one call for the three records (was one per 16 KiB record)
        assert not proto.eof  # paused on that data: the close_notify behind it waits
        _run(loop, _call(proto.transport.resume_reading))
        _run(loop, asyncio.sleep(0.3))
        assert proto.eof and proto.calls == [40000]
    finally:
        lsock.close()
