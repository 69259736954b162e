"""TLS session tickets on a terminating listener: issued by default (Envoy's default), so a client can resume;
none with `disable_stateless_session_resumption` (translated, then applied to the SSL context), which saves
OpenSSL 3.0 a third of a server handshake (bench/tls.py --handshakes)."""

from __future__ import annotations

import socket
from dataclasses import replace

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format

from planemesh.xds.resources import pack
from planemesh.xds.translate_tls import downstream_tls
from tests.proxy.proxy_harness import Backend
from tests.proxy.test_tls_termination import TLS, TlsProxy, certs, client_ctx  # noqa: F401 (fixture)


def _resumes(port: int, ctx) -> tuple[bool, bool]:
    """(a ticket arrived on the first connection, the second connection resumed with it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n")
        while s.recv(65536):
            pass
        session = s.session
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, session=session) as s:
        return bool(session is not None and session.has_ticket), s.session_reused


def test_tickets_by_default_and_none_when_disabled(certs) -> None:  # noqa: F811
    with Backend() as backend:
        with TlsProxy(backend.port) as px:
            assert _resumes(px.port, client_ctx(certs)) == (True, True)
        with TlsProxy(backend.port, tls=replace(TLS, session_tickets=False)) as px:
            assert _resumes(px.port, client_ctx(certs)) == (False, False)


def test_disable_stateless_session_resumption_is_translated() -> None:
    def ctx(**extra):
        msg = json_format.ParseDict({"common_tls_context": {"tls_certificate_sds_secret_configs": [{"name": "d"}]},
                                     **extra}, tls_pb2.DownstreamTlsContext())  # fmt: skip
        return downstream_tls(base_pb2.TransportSocket(name="tls", typed_config=pack(msg)), "chain.transport_socket")

    assert ctx().session_tickets is True
    assert ctx(disable_stateless_session_resumption=True).session_tickets is False
