"""A plane's excess answered locally (429 from its token bucket) keeps a bodiless request's connection open, as
Envoy's local rate limit does: a rate flood costs the plane one parse per request, not one accept, and its
clients do not pile up TIME_WAIT sockets (bench plane_isolation's connection flood after the rate flood opened
768 of its 10,000 connections: 14k TIME_WAIT in the attacker's netns made every connect() scan the port range).
A request whose body was not read is still answered with `Connection: close`."""

from __future__ import annotations

import socket

import pytest

from planemesh.model.planes import SLA
from tests.proxy.proxy_harness import Backend, ProxyThread


@pytest.fixture(scope="module")
def backend():
    with Backend() as be:
        yield be


def _responses(sock: socket.socket, count: int) -> list[bytes]:
    """`count` responses read off `sock`, each framed by its Content-Length (the proxy's local replies carry one)."""
    buf, out = b"", []
    while len(out) < count:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buf[:head_end].lower()
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0]) if b"content-length:" in head else 0
            if len(buf) >= head_end + 4 + length:
                out.append(buf[: head_end + 4 + length])
                buf = buf[head_end + 4 + length :]
                continue
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return out


def test_rate_limited_requests_keep_their_connection(backend) -> None:
    clock = [1000.0]
    sla = SLA(rate_limit_rps=1, rate_limit_burst=1)
    with ProxyThread([("127.0.0.1", backend.port)], sla=sla, clock=lambda: clock[0]) as px:
        with socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
            replies = []
            for _ in range(5):  # one token: 200, then four 429s, all on this one connection (not pipelined)
                s.sendall(b"GET /rl HTTP/1.1\r\nHost: t\r\n\r\n")
                replies += _responses(s, 1)
            assert [r.split(b" ", 2)[1] for r in replies] == [b"200", b"429", b"429", b"429", b"429"]
            assert not any(b"connection: close" in r.lower() for r in replies)
            clock[0] += 1.0  # a token back: the same connection is served again
            s.sendall(b"GET /rl HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
            assert _responses(s, 1)[0].startswith(b"HTTP/1.1 200 ")
        assert px.proxy.stats.rate_limited == 4


def test_rate_limited_request_with_an_unread_body_closes(backend) -> None:
    clock = [1000.0]
    sla = SLA(rate_limit_rps=1, rate_limit_burst=1)
    with (
        ProxyThread([("127.0.0.1", backend.port)], sla=sla, clock=lambda: clock[0]) as px,
        socket.create_connection(("127.0.0.1", px.port), timeout=5) as s,
    ):
        s.sendall(b"GET /rl HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _responses(s, 1)[0].startswith(b"HTTP/1.1 200 ")
        s.sendall(b"POST /rl HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
        reply = _responses(s, 1)[0]
        assert reply.startswith(b"HTTP/1.1 429 ") and b"connection: close" in reply.lower()
        assert s.recv(65536) == b""  # closed: the 99,990 bytes still to come are not read
