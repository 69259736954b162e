"""Malformed HTTP/2 from a client: a connection error gets a GOAWAY with the right code and the connection is
closed; nothing else on the proxy notices (another client's streams are served meanwhile)."""

from __future__ import annotations

import socket
import struct

import h2.config
import h2.connection
import h2.events
import pytest

from tests.proxy.proxy_harness import Backend, ProxyThread

pytestmark = pytest.mark.unit

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = struct.pack(">I", 0)[1:] + bytes([4, 0]) + struct.pack(">I", 0)
PROTOCOL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR = 1, 6, 9


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def server_reaction(port: int, garbage: bytes) -> tuple[int | None, bool]:
    """Send the preface, empty SETTINGS and `garbage`; return (GOAWAY error code or None, closed by server)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.data_to_send()  # we write the preface ourselves, then raw frames
    code, closed = None, False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(PREFACE + EMPTY_SETTINGS + garbage)
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            if not data:
                closed = True
                break
            try:
                events = client.receive_data(data)
            except h2.exceptions.ProtocolError:
                continue
            for event in events:
                if isinstance(event, h2.events.ConnectionTerminated):
                    code = event.error_code
    return code, closed


def one_good_request(port: int) -> int:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/ok")],
                            end_stream=True)  # fmt: skip
        sock.sendall(client.data_to_send())
        while True:
            data = sock.recv(65536)
            assert data, "the proxy closed a good connection"
            for event in client.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return int(dict(event.headers)[b":status"])
            sock.sendall(client.data_to_send())


@pytest.mark.parametrize(
    ("garbage", "expected"),
    [
        (frame(0, 1, 0, b"data on stream 0"), PROTOCOL_ERROR),  # DATA must belong to a stream
        # undecodable HPACK block: a connection error of type COMPRESSION_ERROR (RFC 9113 4.3)
        (frame(1, 4, 1, b"\xff\xff\xff\xff\xff\xff"), COMPRESSION_ERROR),
        (frame(4, 0, 0, b"\x00\x04\x00\x00"), FRAME_SIZE_ERROR),  # SETTINGS whose length is not a multiple of 6
        (frame(8, 0, 0, struct.pack(">I", 0)), PROTOCOL_ERROR),  # WINDOW_UPDATE of 0 on the connection
        (frame(1, 4, 2, b"\x82"), PROTOCOL_ERROR),  # a client stream with an even id
    ],
)
def test_malformed_frames_get_goaway_and_close(garbage: bytes, expected: int) -> None:
    with Backend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as px:
        code, closed = server_reaction(px.port, garbage)
        assert (code, closed) == (expected, True)
        assert one_good_request(px.port) == 200  # the proxy serves the next client as usual
        assert px.proxy.stats.requests_total == 1


def test_header_list_beyond_the_limit_is_refused_not_buffered() -> None:
    """A HEADERS + CONTINUATION flood (one header block that never fits the advertised limit) ends the
    connection instead of growing the proxy's memory."""
    with Backend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as px:
        block = b"\x00\x07x-flood" + b"\x7f\xff\xff\x03" + b"v" * 65535  # literal, never indexed: 64 KiB value
        flood = frame(1, 0, 1, block) + b"".join(frame(9, 0, 1, block) for _ in range(40))  # ~2.6 MB, no END_HEADERS
        code, closed = server_reaction(px.port, flood)
        assert closed and code is not None
        assert one_good_request(px.port) == 200


def test_direct_response_route_over_h2() -> None:
    """A route answered by the proxy itself (direct_response) over h2: its status and body (this used to end
    the client's connection with a TypeError in the proxy)."""
    from planemesh.model.config import DirectResponse, Route

    routes = (Route(action=None, direct_response=DirectResponse(403, b"denied by policy\n")),)
    with Backend() as backend, ProxyThread([("127.0.0.1", backend.port)], routes=routes) as px:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        with socket.create_connection(("127.0.0.1", px.port), timeout=5) as sock:
            client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/")],
                                end_stream=True)  # fmt: skip
            sock.sendall(client.data_to_send())
            status, body, ended = 0, b"", False
            while not ended:
                data = sock.recv(65536)
                assert data, "the proxy closed the connection"
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
        assert (status, body) == (403, b"denied by policy\n")


def test_a_clients_graceful_goaway_lets_its_streams_complete() -> None:
    """GOAWAY(NO_ERROR) from the client after a request: the response still comes (RFC 9113 6.8: the streams
    it opened complete), then the proxy closes the connection. Before, the proxy cancelled every stream."""
    with Backend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as px:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        with socket.create_connection(("127.0.0.1", px.port), timeout=5) as sock:
            client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/a")],
                                end_stream=True)  # fmt: skip
            goaway = struct.pack(">I", 8)[1:] + bytes((7, 0)) + struct.pack(">III", 0, 0, 0)  # last 0, NO_ERROR
            sock.sendall(client.data_to_send() + goaway)
            status, ended, closed = 0, False, False
            while not closed:
                data = sock.recv(65536)
                if not data:
                    closed = True
                    break
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
        assert (status, ended, closed) == (200, True, True)
        assert backend.seen[-1][1] == "/a"
