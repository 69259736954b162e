"""HBONE between two nodes on loopback (real TLS 1.3, real h2, real sockets): tunnels carry bytes both ways with
half-close, share one pooled connection per (source identity, peer node), and every refusal closes the client:
RBAC deny, wrong CA, wrong peer identity, unknown source or destination, a destination that refuses."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import ssl

import h2.config
import h2.connection
import h2.events
import pytest
import uvloop

from planemesh.agent.hbone import conn as hbone_conn
from planemesh.agent.hbone import inbound as hbone_inbound
from planemesh.agent.hbone.certs import CaCertSource
from planemesh.agent.hbone.settings import parse_rbac
from planemesh.agent.identity.ca import new_root, utcnow
from planemesh.agent.identity.spiffe import parse_spiffe_id
from tests.proxy.hbone_harness import ID_A, NODE_A, POD_A, POD_B, hbone_pair, node_cas, recv_all


def run(coro) -> None:  # type: ignore[no-untyped-def]
    uvloop.run(asyncio.wait_for(coro, 60))  # the node's loop (agent/hbone/node.py)


def deny(principal: str) -> dict:
    return {"rules": {"action": "DENY", "policies": {"no-amf": {
        "permissions": [{"any": True}],
        "principals": [{"authenticated": {"principal_name": {"exact": principal}}}]}}}}  # fmt: skip


async def _echo_roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, payload)
    sock.shutdown(socket.SHUT_WR)  # half-close: the echo pod sees EOF, answers, closes
    return await recv_all(sock)


def test_tunnel_carries_bytes_both_ways_with_half_close() -> None:
    async def scenario() -> None:
        async with hbone_pair(*node_cas()) as pair:
            payload = os.urandom(3 << 20)
            sock = await pair.open()
            assert await _echo_roundtrip(sock, payload) == payload
            sock.close()
            assert pair.stats_a.tunnels_out == 1 and pair.stats_b.tunnels_in == 1

    run(scenario())


def test_many_tunnels_share_one_pooled_connection_per_identity_and_peer() -> None:
    async def scenario() -> None:
        async with hbone_pair(*node_cas()) as pair:
            socks = await asyncio.gather(*(pair.open() for _ in range(20)))
            payloads = [os.urandom(100_000) for _ in socks]
            got = await asyncio.gather(*(_echo_roundtrip(s, p) for s, p in zip(socks, payloads, strict=True)))
            assert got == payloads
            for s in socks:
                s.close()
            assert pair.stats_a.connections_out == 1  # one mTLS h2 connection ...
            assert pair.stats_b.connections_in == 1
            (held,) = pair.outbound.pool.conns.values()
            assert held[0][1].total_streams == 20  # ... carrying 20 CONNECT streams
            await asyncio.sleep(0.2)
            assert held[0][1].streams == {}  # every finished tunnel forgotten, both ends
            assert [c.streams for c in pair.inbound.open] == [{}]

    run(scenario())


def test_rbac_deny_for_the_source_identity_refuses_the_tunnel() -> None:
    async def scenario() -> None:
        async with hbone_pair(*node_cas(), rbacs=parse_rbac([deny(ID_A)])) as pair:
            sock = await pair.open()
            assert await recv_all(sock) == b""  # closed without a byte
            sock.close()
            assert pair.stats_b.refused_in == {"rbac_denied": 1} and pair.stats_b.tunnels_in == 0
            assert pair.stats_a.refused_out == {"status_403": 1}

    run(scenario())


def test_rbac_deny_of_another_identity_lets_the_source_through() -> None:
    async def scenario() -> None:
        async with hbone_pair(*node_cas(), rbacs=parse_rbac([deny("spiffe://cluster.local/ns/x/sa/y")])) as pair:
            sock = await pair.open()
            assert await _echo_roundtrip(sock, b"hello") == b"hello"
            sock.close()

    run(scenario())


def test_a_source_node_from_another_ca_is_refused_at_the_handshake() -> None:
    async def scenario() -> None:
        ca_a, _ = node_cas()  # another root
        _, ca_b = node_cas()
        async with hbone_pair(ca_a, ca_b, peer_identity=None) as pair:
            sock = await pair.open()
            assert await recv_all(sock) == b""
            sock.close()
            assert pair.stats_a.refused_out == {"connect_failed": 1}
            assert pair.stats_b.tunnels_in == 0 and pair.stats_b.connections_in == 0

    run(scenario())


def test_a_peer_node_with_another_identity_is_refused() -> None:
    async def scenario() -> None:
        async with hbone_pair(*node_cas(), peer_identity=NODE_A) as pair:  # node B presents NODE_B
            sock = await pair.open()
            assert await recv_all(sock) == b""
            sock.close()
            assert pair.stats_a.refused_out == {"connect_failed": 1} and pair.stats_b.tunnels_in == 0

    run(scenario())


def test_unknown_source_and_unknown_destination_are_refused() -> None:
    async def scenario() -> None:
        async with hbone_pair(*node_cas()) as pair:
            sock = await pair.open(src="127.0.0.99")  # not a workload of node A: no identity to present
            assert await recv_all(sock) == b""
            sock.close()
            assert pair.stats_a.refused_out == {"unknown_source": 1}
            pair.outbound.routes.peers[0].cidrs  # noqa: B018 - the peer's CIDR is POD_B/32 only
            sock = await pair.open(dst="127.0.0.21")  # no peer carries it
            assert await recv_all(sock) == b""
            sock.close()
            assert pair.stats_a.refused_out["no_route"] == 1

    run(scenario())


def test_destination_that_is_not_a_local_pod_or_refuses_connections() -> None:
    async def scenario() -> None:
        async with hbone_pair(*node_cas()) as pair:
            closed = socket.socket()
            closed.bind((POD_B, 0))
            port = closed.getsockname()[1]
            closed.close()  # nothing listens there: the pod refuses
            sock = await pair.open(port=port)
            assert await recv_all(sock) == b""
            sock.close()
            assert pair.stats_b.dial_failed == 1 and pair.stats_a.refused_out == {"status_503": 1}

    run(scenario())


def test_same_root_different_node_intermediates_interoperate() -> None:
    async def scenario() -> None:
        root = new_root("cluster.local", now=utcnow())
        async with hbone_pair(*node_cas(root)) as pair:
            sock = await pair.open()
            assert await _echo_roundtrip(sock, b"x" * 10) == b"x" * 10
            sock.close()
            assert POD_A and POD_B

    run(scenario())


def _client_ctx(trust_pem: bytes, chain_pem: bytes | None, key_pem: bytes | None, tmp: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=trust_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    if chain_pem is not None and key_pem is not None:
        path = os.path.join(tmp, "client.pem")
        with open(path, "wb") as f:
            f.write(chain_pem + key_pem)
        ctx.load_cert_chain(path)
    return ctx


def test_the_listener_refuses_a_client_from_another_ca_without_a_certificate_or_in_plaintext(tmp_path) -> None:
    async def scenario() -> None:
        ca_a, ca_b = node_cas()
        foreign = new_root("cluster.local", now=utcnow()).issue(parse_spiffe_id(ID_A), now=utcnow())
        async with hbone_pair(ca_a, ca_b) as pair:
            assert pair.inbound.server is not None
            port = pair.inbound.server.sockets[0].getsockname()[1]
            trust = ca_b.root_pem()
            for chain, key in ((foreign.cert_chain_pem(), foreign.key_pem()), (None, None)):
                ctx = _client_ctx(trust, chain, key, str(tmp_path))
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
                    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                    await writer.drain()
                    assert await reader.read(1) == b""  # TLS 1.3: the server's alert comes after the client's Finished
                    raise ConnectionError("closed")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"CONNECT 127.0.0.20:80 HTTP/1.1\r\n\r\n")
            assert await asyncio.wait_for(reader.read(100), 15) == b""  # plaintext: no TLS record answers it
            writer.close()
            assert pair.stats_b.connections_in == 0 and pair.stats_b.tunnels_in == 0

    run(scenario())


def _raw_h2_client(ca, tmp: str) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    issued = ca.issue(parse_spiffe_id(ID_A), now=utcnow())
    return _client_ctx(ca.root_pem(), issued.cert_chain_pem(), issued.key_pem(), tmp)


def test_bad_requests_get_their_status_and_garbage_closes_only_its_connection(tmp_path) -> None:
    async def scenario() -> None:
        ca_a, ca_b = node_cas()
        async with hbone_pair(ca_a, ca_b) as pair:
            assert pair.inbound.server is not None
            port = pair.inbound.server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_raw_h2_client(ca_a, str(tmp_path)))
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.initiate_connection()
            heads = {
                1: [(":method", "GET"), (":authority", f"{POD_B}:80"), (":scheme", "https"), (":path", "/")],
                3: [(":method", "CONNECT"), (":authority", f"pod-b.ran:{pair.echo_port}")],
                5: [(":method", "CONNECT"), (":authority", f"127.0.0.99:{pair.echo_port}")],  # not node B's pod
            }
            for sid, head in heads.items():
                client.send_headers(sid, head, end_stream=sid == 1)
            writer.write(client.data_to_send())
            statuses: dict[int, bytes] = {}
            async with asyncio.timeout(10):
                while len(statuses) < 3:
                    data = await reader.read(65536)
                    assert data
                    for ev in client.receive_data(data):
                        if isinstance(ev, h2.events.ResponseReceived):
                            statuses[ev.stream_id] = dict(ev.headers)[b":status"]
            assert statuses == {1: b"405", 3: b"400", 5: b"404"}
            writer.write(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00X")  # DATA on stream 0: a connection error
            with contextlib.suppress(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 10)  # read to the end: the listener closed it
            assert reader.at_eof() or writer.is_closing()
            writer.close()
            sock = await pair.open()  # the listener still serves everyone else
            assert await _echo_roundtrip(sock, b"still fine") == b"still fine"
            sock.close()
            assert pair.stats_b.refused_in == {"bad_request": 2, "unknown_destination": 1}

    run(scenario())


def test_a_renewed_certificate_opens_a_new_connection_and_the_old_tunnel_continues() -> None:
    async def scenario() -> None:
        ca_a, ca_b = node_cas()
        now = [utcnow() - dt.timedelta(seconds=2000)]  # the first certificate is past half-life by real time
        certs = CaCertSource(ca_a, NODE_A, ttl_s=3600, clock=lambda: now[0])
        async with hbone_pair(ca_a, ca_b, certs_a=certs) as pair:
            old = await pair.open()
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(old, b"before")
            assert await recv_all(old, 6) == b"before"
            now[0] = utcnow()  # past half-life: the next tunnel gets a new certificate
            new = await pair.open()
            assert await _echo_roundtrip(new, b"new") == b"new"
            assert await _echo_roundtrip(old, b"after") == b"after"  # the open tunnel kept its connection
            assert pair.stats_a.connections_out == 2 and certs.issued == 2
            old.close()
            new.close()

    run(scenario())


def test_a_second_connection_only_when_the_peer_stream_limit_is_reached(monkeypatch) -> None:
    monkeypatch.setattr(hbone_conn, "MAX_STREAMS", 2)  # what both ends advertise

    async def scenario() -> None:
        async with hbone_pair(*node_cas()) as pair:
            socks = [await pair.open() for _ in range(3)]
            assert pair.stats_a.connections_out == 2 and pair.stats_a.tunnels_out == 3
            got = await asyncio.gather(*(_echo_roundtrip(s, b"%d" % i) for i, s in enumerate(socks)))
            assert got == [b"0", b"1", b"2"]
            for s in socks:
                s.close()

    run(scenario())


async def _stalled_pod(host: str) -> asyncio.Server:
    """Never reads its first connection (its receive buffer fills, then the tunnel must stop); echoes the others."""
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not held:
            held.append(writer)
            await asyncio.sleep(3600)
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, host, 0)


def test_a_pod_that_does_not_read_stops_its_stream_without_unbounded_buffering() -> None:
    async def scenario() -> None:
        async with hbone_pair(*node_cas(), server=_stalled_pod) as pair:
            sock = await pair.open()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
            loop = asyncio.get_running_loop()
            block, sent = b"z" * (1 << 16), 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    while True:
                        await loop.sock_sendall(sock, block)
                        sent += len(block)
            assert sent > 0
            # what the nodes hold: the stream window (4 MiB) plus socket buffers on the way, never the whole stream
            assert sent < hbone_conn.STREAM_WINDOW + (24 << 20), sent
            other = await pair.open()  # another tunnel on the same pooled connection keeps flowing
            assert await _echo_roundtrip(other, b"x" * 100_000) == b"x" * 100_000
            assert pair.stats_a.connections_out == 1
            sock.close()
            other.close()

    run(scenario())


def test_the_pool_releases_a_connection_idle_for_five_minutes_but_not_one_in_use() -> None:
    async def scenario() -> None:
        async with hbone_pair(*node_cas()) as pair:
            pool, loop = pair.outbound.pool, asyncio.get_running_loop()
            busy = await pair.open()
            assert pool.release_idle(loop.time() + 3600) == 0  # a tunnel is open on it
            assert await _echo_roundtrip(busy, b"a") == b"a"
            busy.close()
            await asyncio.sleep(0.2)  # the tunnel's end reaches both nodes
            assert pool.release_idle(loop.time() + 299) == 0
            assert pool.release_idle(loop.time() + 301) == 1
            sock = await pair.open()  # a new connection
            assert await _echo_roundtrip(sock, b"b") == b"b"
            sock.close()
            assert pair.stats_a.connections_out == 2

    run(scenario())


def test_peer_connections_beyond_the_budget_are_closed_and_counted(monkeypatch) -> None:
    monkeypatch.setattr(hbone_inbound, "MAX_CONNECTIONS", 1)

    async def scenario() -> None:
        ca_a, ca_b = node_cas()
        now = [utcnow() - dt.timedelta(seconds=2000)]
        certs = CaCertSource(ca_a, NODE_A, ttl_s=3600, clock=lambda: now[0])
        async with hbone_pair(ca_a, ca_b, certs_a=certs) as pair:
            first = await pair.open()
            now[0] = utcnow()  # renewed certificate: the next tunnel needs a second connection
            second = await pair.open()
            assert await recv_all(second) == b""
            assert pair.stats_b.refused_in == {"overloaded": 1}
            assert await _echo_roundtrip(first, b"ok") == b"ok"  # the admitted connection is untouched
            first.close()
            second.close()

    run(scenario())


def test_a_node_handing_over_sends_goaway_new_tunnels_take_a_new_connection_the_open_one_finishes() -> None:
    """`drain()` (a node handing over): the peer's pool stops opening streams on that connection, the open tunnel
    carries bytes both ways to its end (h2 would close its state machine on the GOAWAY: conn.py keeps it open)."""

    async def scenario() -> None:
        async with hbone_pair(*node_cas()) as pair:
            old = await pair.open()
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(old, b"before")
            assert await recv_all(old, 6) == b"before"
            (served,) = pair.inbound.open
            served.drain()
            async with asyncio.timeout(10):
                while not all(c.goaway for held in pair.outbound.pool.conns.values() for _, c in held):
                    await asyncio.sleep(0.01)
            new = await pair.open()
            assert await _echo_roundtrip(new, b"new") == b"new"
            assert pair.stats_a.connections_out == 2 and pair.stats_b.connections_in == 2
            assert await _echo_roundtrip(old, b"after" * 1000) == b"after" * 1000  # both ways, after the GOAWAY
            old.close()
            new.close()

    run(scenario())
