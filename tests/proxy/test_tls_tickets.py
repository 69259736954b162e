"""TLS session tickets on a terminating listener: issued by default (Envoy's default), so a client can resume;
no resumption with `disable_stateless_session_resumption` (translated, then applied to the SSL context). The
proxy's listeners run on the TLS engine (stateless tickets, OpenSSL >= 3.2); the stdlib contexts of the benches'
baseline get TLS 1.3 stateful tickets over a bounded session cache (bench/tls_stdlib.py: OpenSSL 3.0's
stateless tickets cost a third of a server mTLS handshake); a session resumes only on the context that issued it
and keeps the client's identity."""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import replace

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format
from OpenSSL import SSL

from bench.tls_stdlib import (
    build_context,
    session_cache_size,
    ssl_ctx_pointer,
    use_stateful_tickets,
)
from planemesh.model.tls_config import CertSecret, TrustSecret
from planemesh.xds.resources import pack
from planemesh.xds.translate_tls import downstream_tls
from tests.proxy.proxy_harness import Backend, log_line_for
from tests.proxy.test_tls_termination import AMF, GW, NOW, OTHER, ROOT, TLS, TlsProxy, certs, client_ctx  # noqa: F401


def _first_session(port: int, ctx, path: str):
    """The TLS session of a first connection that GETs `path` and reads the response to its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n".encode())
        while s.recv(65536):
            pass
        return s.session


def _resumes(port: int, ctx) -> tuple[bool, bool]:
    """(a ticket arrived on the first connection, the second connection resumed with it)."""
    session = _first_session(port, ctx, "/")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, session=session) as s:
        return bool(session is not None and session.has_ticket), s.session_reused


def _options(ctx: SSL.Context) -> int:
    """A TLS engine context's options (pyOpenSSL allows no set_options(0) read once the context is in use)."""
    return SSL._lib.SSL_CTX_get_options(ctx._context)  # type: ignore[attr-defined]


def test_tickets_by_default_and_no_resumption_when_disabled(certs) -> None:  # noqa: F811
    """Disabled: no stateless ticket and no session cache, so nothing resumes. The TLS engine still sends a
    TLS 1.3 stateful ticket that no cache backs (pyOpenSSL exposes no SSL_CTX_set_num_tickets): it cannot resume."""
    with Backend() as backend:
        with TlsProxy(backend.port) as px:
            assert _resumes(px.port, client_ctx(certs)) == (True, True)
        with TlsProxy(backend.port, tls=replace(TLS, session_tickets=False)) as px:
            assert _resumes(px.port, client_ctx(certs))[1] is False
            [ctx] = px.call(px.proxy.table.tls.contexts)
            assert _options(ctx) & SSL.OP_NO_TICKET and ctx.get_session_cache_mode() == SSL.SESS_CACHE_OFF


def test_disable_stateless_session_resumption_is_translated() -> None:
    def ctx(**extra):
        msg = json_format.ParseDict({"common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": "d"}]},
                                     **extra}, tls_pb2.DownstreamTlsContext())  # fmt: skip
        return downstream_tls(base_pb2.TransportSocket(name="tls", typed_config=pack(msg)), "chain.transport_socket")

    assert ctx().session_tickets is True
    assert ctx(disable_stateless_session_resumption=True).session_tickets is False


def _path_resumed(port: int, ctx, path: str) -> bool:
    """Two connections (GET `path` on the second, resuming the first's session): did the second resume?"""
    session = _first_session(port, ctx, "/first")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, session=session) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n".encode())
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head
        return s.session_reused


def test_tickets_are_stateless_and_a_resumed_connection_keeps_the_client_identity(certs) -> None:  # noqa: F811
    """Tickets on (the TLS engine, OpenSSL >= 3.2: a stateless ticket no longer re-decodes the client's
    certificate): a resumed connection still carries the client's certificate (its SPIFFE ID in the access log,
    the SAN matchers applied)."""
    with Backend() as backend, TlsProxy(backend.port) as px:
        assert _path_resumed(px.port, client_ctx(certs), "/resumed")
        line = log_line_for(px, "/resumed")
        assert "spiffe://cluster.local/ns/ran/sa/amf" in line, line
        [ctx] = px.call(px.proxy.table.tls.contexts)
        assert not _options(ctx) & SSL.OP_NO_TICKET  # stateless tickets
        assert px.stats["handshakes"] == 2 and px.stats["san_refused"] == 0


def _handshake(server_ctx: ssl.SSLContext, client: ssl.SSLContext, session=None):
    """A full in-memory handshake (real OpenSSL, MemoryBIO): (client SSLObject, server SSLObject)."""
    cin, cout, sin, sout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(cin, cout, server_side=False, session=session)
    s = server_ctx.wrap_bio(sin, sout, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, (obj, out, peer_in) in enumerate(((c, cout, sin), (s, sout, cin))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done):
            break
    with contextlib.suppress(ssl.SSLWantReadError):
        c.read(1)  # the client takes the tickets sent after the handshake
    cin.write(sout.read())
    with contextlib.suppress(ssl.SSLWantReadError):
        c.read(1)
    return c, s


def _server_ctx(issued, trust_pem: bytes, cache_size: int | None = None) -> ssl.SSLContext:
    cert = CertSecret(issued.cert_chain_pem(), issued.key_pem())
    if cache_size is None:
        return build_context(TLS, cert, TrustSecret(trust_pem), server=True)
    ctx = build_context(replace(TLS, session_tickets=False), cert, TrustSecret(trust_pem), server=True)
    ctx.num_tickets, ctx.options = 2, ctx.options & ~ssl.OP_NO_TICKET
    assert use_stateful_tickets(ctx, cache_size)
    return ctx


def test_session_cache_is_bounded(certs) -> None:  # noqa: F811
    ctx = _server_ctx(ROOT.issue(GW, now=NOW), ROOT.root_pem(), cache_size=4)
    assert session_cache_size(ctx) == 4
    for _ in range(8):
        _c, s = _handshake(ctx, client_ctx(certs))
        assert s.getpeercert()["subjectAltName"] == (("URI", "spiffe://cluster.local/ns/ran/sa/amf"),)
    stats = ctx.session_stats()
    assert 1 <= stats["number"] <= 4 and stats["cache_full"] > 0  # old sessions evicted, never more than 4


def test_a_session_resumes_only_on_the_context_that_issued_it(certs) -> None:  # noqa: F811
    """After a rotation (a new context), an old session is a full handshake again: with the new trust
    bundle a client certificate the new roots do not sign is refused, never resumed past the check."""
    old = _server_ctx(ROOT.issue(GW, now=NOW), ROOT.root_pem())
    client = client_ctx(certs)  # a session resumes only through the client context that made it
    c, _ = _handshake(old, client)
    session = c.session
    assert session is not None and session.has_ticket
    again, s = _handshake(old, client, session=session)
    assert again.session_reused and s.getpeercert()  # resumed, identity kept
    rotated = _server_ctx(ROOT.issue(GW, now=NOW), ROOT.root_pem())
    fresh, _ = _handshake(rotated, client, session=session)
    assert not fresh.session_reused
    other_trust = _server_ctx(ROOT.issue(GW, now=NOW), OTHER.root_pem())
    with pytest.raises(ssl.SSLError):
        _handshake(other_trust, client, session=session)


def test_cpython_ssl_ctx_is_found_and_checked() -> None:
    """The SSL_CTX pointer is confirmed by two fields; a context whose options then change is still found, and
    a non-SSLContext object of the same size is never taken for one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert ssl_ctx_pointer(ctx) is not None
    ctx.options |= ssl.OP_NO_COMPRESSION
    assert ssl_ctx_pointer(ctx) is not None
    assert session_cache_size(ctx) == 20480  # OpenSSL's default, untouched until use_stateful_tickets


def test_tls12_client_resumes_by_session_id(certs) -> None:  # noqa: F811
    """With stateful tickets a TLS 1.2 client gets no RFC 5077 ticket but resumes by session ID."""
    server = _server_ctx(ROOT.issue(GW, now=NOW), ROOT.root_pem())
    client = client_ctx(certs)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    c, _ = _handshake(server, client)
    assert c.version() == "TLSv1.2" and not c.session.has_ticket
    again, s = _handshake(server, client, session=c.session)
    assert again.session_reused and s.getpeercert()["subjectAltName"] == (("URI", str(AMF)),)
