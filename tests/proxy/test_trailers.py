"""HTTP/1.1 trailers through the proxy, byte-checked with raw sockets on both sides (and h2 <-> h1)."""

from __future__ import annotations

import contextlib
import socket
import time

import h2.config
import h2.connection
import h2.events
import pytest

from tests.proxy.proxy_harness import ProxyThread
from tests.support.servers import AcceptLoop

CHUNKED_WITH_TRAILERS = (
    b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n"
    b"0\r\nX-Checksum: abc123\r\nX-Other: two\r\nHost: evil\r\nConnection: close\r\nTE: trailers\r\n\r\n"
)
# What the proxy must pass on: names lower-cased, framing, routing and hop-by-hop fields dropped.
RELAYED_TRAILERS = b"x-checksum: abc123\r\nx-other: two\r\n\r\n"
RESPONSE_WITH_TRAILERS = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
    b"4\r\nbody\r\n3\r\n!!!\r\n0\r\ngrpc-status: 0\r\nX-Sum: 9\r\nTransfer-Encoding: gzip\r\n\r\n"
)


class RawUpstream:
    """Accepts connections, reads one request per connection (chunked bodies decoded here, byte by byte of
    their framing) and answers with `response` as raw bytes. Records (head, data, trailer section)."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.requests: list[tuple[bytes, bytes, bytes]] = []

    def __enter__(self) -> RawUpstream:
        self.loop = AcceptLoop(self.sock, self._one)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.close()

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError, ValueError):  # a request the proxy aborted ends early
            f = conn.makefile("rb")
            head = b""
            while (line := f.readline()) not in (b"\r\n", b""):
                head += line
            data = b""
            trailers = b""
            if b"transfer-encoding: chunked" in head.lower():
                while True:
                    size = int(f.readline().strip(), 16)
                    if size == 0:
                        while True:
                            line = f.readline()
                            trailers += line
                            if line in (b"\r\n", b""):
                                break
                        break
                    data += f.read(size)
                    assert f.read(2) == b"\r\n"
            self.requests.append((head, data, trailers))
            with contextlib.suppress(OSError):
                conn.sendall(self.response)
                conn.shutdown(socket.SHUT_WR)
                f.read()


def read_until_closed(sock: socket.socket) -> bytes:
    out = b""
    while data := sock.recv(65536):
        out += data
    return out


def exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        return read_until_closed(s)


def test_request_trailers_are_relayed_upstream() -> None:
    with (
        RawUpstream(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n") as up,
        ProxyThread([("127.0.0.1", up.port)]) as px,
    ):
        reply = exchange(px.port, CHUNKED_WITH_TRAILERS.replace(b"Host: a\r\n", b"Host: a\r\nConnection: close\r\n", 1))
        assert reply.startswith(b"HTTP/1.1 204 "), reply
        head, data, trailers = up.requests[0]
        assert b"transfer-encoding: chunked" in head and data == b"hello world"
        assert trailers == RELAYED_TRAILERS


def test_response_trailers_are_relayed_to_the_client() -> None:
    with RawUpstream(RESPONSE_WITH_TRAILERS) as up, ProxyThread([("127.0.0.1", up.port)]) as px:
        reply = exchange(px.port, b"GET /t HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head
        assert body == b"4\r\nbody\r\n3\r\n!!!\r\n0\r\ngrpc-status: 0\r\nx-sum: 9\r\n\r\n"
        # An HTTP/1.0 client's body is close-delimited: the body arrives whole, the trailers cannot.
        reply = exchange(px.port, b"GET /t HTTP/1.0\r\nHost: a\r\n\r\n")
        assert reply.partition(b"\r\n\r\n")[2] == b"body!!!"


def test_keep_alive_after_trailers() -> None:
    response = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    with RawUpstream(response) as up, ProxyThread([("127.0.0.1", up.port)]) as px:
        with socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
            f = s.makefile("rb")
            for request in (CHUNKED_WITH_TRAILERS.replace(b"Connection: close\r\n", b""), CHUNKED_WITH_TRAILERS):
                s.sendall(request)
                assert f.readline().startswith(b"HTTP/1.1 200 ")
                head = b""
                while (line := f.readline()) != b"\r\n":
                    head += line
                assert f.read(2) == b"ok"
            # `Connection: close` came as a trailer of the second request: answered, then closed.
            assert b"connection: close" in head and f.read() == b""
        assert [r[2] for r in up.requests] == [RELAYED_TRAILERS, RELAYED_TRAILERS]


@pytest.mark.parametrize(
    "trailer_section",
    [
        b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 1000) for i in range(80)) + b"\r\n",  # 80 KB of trailers
        b"x-endless: " + b"v" * 100_000,  # a trailer line that never ends
    ],
)
def test_oversized_trailers_get_431(trailer_section: bytes) -> None:
    with (
        RawUpstream(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n") as up,
        ProxyThread([("127.0.0.1", up.port)]) as px,
    ):
        with socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n")
            time.sleep(0.05)  # the request head went upstream; the trailers come afterwards
            try:
                s.sendall(trailer_section)
            except ConnectionError:
                pass
            reply = read_until_closed(s)
        # The request was already on its way upstream: the proxy ends it (no response had started) with 431.
        assert reply.startswith(b"HTTP/1.1 431 ") and reply.endswith(b"request header fields too large\n"), reply
        assert up.requests == []  # the upstream never saw a complete request


def test_framing_fields_in_trailers_are_refused() -> None:
    """llhttp refuses Content-Length in trailers (a smuggling vector): 400, nothing relayed."""
    with (
        RawUpstream(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n") as up,
        ProxyThread([("127.0.0.1", up.port)]) as px,
    ):
        reply = exchange(px.port, CHUNKED_WITH_TRAILERS.replace(b"TE: trailers", b"Content-Length: 9"))
        assert reply.startswith(b"HTTP/1.1 400 "), reply
        assert up.requests == []


def test_h2_client_and_h1_upstream_exchange_trailers() -> None:
    with RawUpstream(RESPONSE_WITH_TRAILERS) as up, ProxyThread([("127.0.0.1", up.port)]) as px:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        with socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
            conn.send_headers(1, [(b":method", b"POST"), (b":path", b"/h2"), (b":scheme", b"http"),
                                  (b":authority", b"a"), (b"te", b"trailers")])  # fmt: skip
            conn.send_data(1, b"hello world")
            conn.send_headers(1, [(b"x-checksum", b"abc123")], end_stream=True)
            s.sendall(conn.data_to_send())
            body, trailers, ended = b"", None, False
            while not ended:
                data = s.recv(65536)
                assert data, "proxy closed the h2 connection"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, 1)
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers = event.headers
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                s.sendall(conn.data_to_send())
        assert body == b"body!!!"
        assert trailers == [(b"grpc-status", b"0"), (b"x-sum", b"9")]
        _, data, request_trailers = up.requests[0]
        assert data == b"hello world" and request_trailers == b"x-checksum: abc123\r\n\r\n"
