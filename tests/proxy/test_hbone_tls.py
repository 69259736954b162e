"""HBONE's mTLS on the TLS engine (agent/tls/: pyOpenSSL over the cryptography wheel's OpenSSL), on loopback with
real sockets: both ends of a pooled connection run on it (TLS 1.3, ALPN h2, each side's SPIFFE ID read from the
other's certificate), the node certificate is chosen per accepted connection (a renewed one serves the next
handshake, the open connection keeps the old one), a failed or stalled handshake is closed and counted on
either side, and a listener without a node certificate refuses every handshake (fail closed)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import replace

import pytest
import uvloop
from OpenSSL import SSL

from planemesh.agent.hbone import inbound as hbone_inbound
from planemesh.agent.hbone import outbound as hbone_outbound
from planemesh.agent.hbone.certs import CaCertSource
from planemesh.agent.hbone.csr_certs import NoCertificate
from planemesh.agent.hbone.node import tune_malloc
from planemesh.agent.tls.engine import TlsPeerView
from planemesh.agent.tls.transport import TlsTransport
from tests.proxy.hbone_harness import ID_A, NODE_B, POD_A, POD_B, hbone_pair, node_cas, open_tunnel, recv_all


def run(coro) -> None:  # type: ignore[no-untyped-def]
    uvloop.run(asyncio.wait_for(coro, 60))  # the node's loop (agent/hbone/node.py)


async def _roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, payload)
    return await recv_all(sock, len(payload))


def _pooled(pair) -> list:  # type: ignore[no-untyped-def]
    return [conn for held in pair.outbound.pool.conns.values() for _, conn in held]


def test_both_ends_of_a_tunnel_run_on_the_tls_engine_with_tls13_h2_and_spiffe_ids() -> None:
    async def scenario() -> None:
        async with hbone_pair(*node_cas()) as pair:
            sock = await pair.open()
            assert await _roundtrip(sock, b"engine") == b"engine"
            (client,) = _pooled(pair)
            (server,) = pair.inbound.open
            for conn in (client, server):
                assert isinstance(conn.transport, TlsTransport)  # not the stdlib's SSL transport (the old code)
                view = conn.transport.get_extra_info("ssl_object")
                assert isinstance(view, TlsPeerView)
                assert view.version() == "TLSv1.3" and view.selected_alpn_protocol() == "h2"
                assert isinstance(conn.transport.get_extra_info("sslcontext"), SSL.Context)
            assert client.peer_identity == NODE_B and server.peer_identity == ID_A
            sock.close()

    run(scenario())


class _Renewing(CaCertSource):
    """Node B's certificates from its CA, renewed on demand (as at half-life)."""

    def renew(self) -> None:
        self._server = None


def test_a_renewed_node_certificate_serves_the_next_handshake_and_the_open_connection_keeps_its_own() -> None:
    async def scenario() -> None:
        ca_a, ca_b = node_cas()
        certs_b = _Renewing(ca_b, NODE_B)
        async with hbone_pair(ca_a, ca_b, certs_b=certs_b) as pair:
            old = await pair.open()
            assert await _roundtrip(old, b"one") == b"one"
            (first,) = _pooled(pair)
            first_der = first.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            certs_b.renew()
            first.goaway = True  # the pool's next tunnel takes a new connection (as after a GOAWAY)
            new = await pair.open()
            assert await _roundtrip(new, b"two") == b"two"
            second = next(c for c in _pooled(pair) if c is not first)
            second_der = second.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert first_der and second_der and first_der != second_der and certs_b.issued == 2
            assert second.peer_identity == NODE_B
            assert await _roundtrip(old, b"still") == b"still"  # the open connection kept its handshake
            old.close()
            new.close()

    run(scenario())


def test_failed_handshakes_are_counted_and_a_stalled_one_times_out(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(hbone_inbound, "HANDSHAKE_TIMEOUT_S", 0.5)

    async def scenario() -> None:
        async with hbone_pair(*node_cas()) as pair:
            assert pair.inbound.server is not None
            port = pair.inbound.server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_no_cert_client())
            with pytest.raises((ssl.SSLError, ConnectionError)):  # no client certificate: refused
                writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                await writer.drain()
                if await asyncio.wait_for(reader.read(1), 10) == b"":
                    raise ConnectionError("closed")
            writer.close()
            loop = asyncio.get_running_loop()
            stalled = socket.create_connection(("127.0.0.1", port))  # TCP, then nothing
            stalled.setblocking(False)
            t0 = loop.time()
            assert await recv_all(stalled) == b""  # closed by the listener
            assert 0.4 <= loop.time() - t0 < 5
            stalled.close()
            sock = await pair.open()  # everyone else is served
            assert await _roundtrip(sock, b"ok") == b"ok"
            sock.close()
            assert pair.stats_b.refused_in == {"handshake_failed": 2}
            assert pair.stats_b.peers_in["-"].refused == {"handshake_failed": 2}  # one row for unknown sources

    run(scenario())


def _no_cert_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    return ctx


def test_a_peer_that_never_finishes_the_handshake_fails_the_tunnel_after_the_timeout(monkeypatch) -> None:
    monkeypatch.setattr(hbone_outbound, "HANDSHAKE_TIMEOUT_S", 0.5)

    async def scenario() -> None:
        async with hbone_pair(*node_cas()) as pair:
            mute = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog), never answers
            routes = pair.outbound.routes
            peer = replace(routes.peers[0], address=mute.getsockname())
            pair.outbound.routes = replace(routes, peers=(peer,))
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            sock = await open_tunnel(pair.outbound, POD_A, POD_B, pair.echo_port)
            assert 0.4 <= loop.time() - t0 < 5
            assert await recv_all(sock) == b""  # the pod's connection is closed
            assert pair.stats_a.refused_out == {"connect_failed": 1}
            sock.close()
            mute.close()

    run(scenario())


class _NoNodeCert(CaCertSource):
    """A node whose own certificate has not arrived (CreateCertificate unanswered)."""

    def server_context(self) -> SSL.Context:
        raise NoCertificate(f"no certificate for the node {NODE_B} yet")


def test_a_listener_without_a_node_certificate_refuses_every_handshake() -> None:
    async def scenario() -> None:
        ca_a, ca_b = node_cas()
        async with hbone_pair(ca_a, ca_b, certs_b=_NoNodeCert(ca_b, NODE_B)) as pair:
            sock = await pair.open()
            assert await recv_all(sock) == b""
            sock.close()
            assert pair.stats_a.refused_out == {"connect_failed": 1}
            assert pair.stats_b.refused_in == {"handshake_failed": 1} and pair.stats_b.tunnels_in == 0

    run(scenario())


def test_the_node_process_sets_glibcs_malloc_thresholds() -> None:
    assert tune_malloc() is True  # glibc accepted both (mallopt returns 1)
