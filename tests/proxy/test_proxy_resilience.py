"""Retries per the plane SLA, upstream resets, client disconnects, Expect: 100-continue, CONNECT."""

from __future__ import annotations

import http.client
import socket
import time

import pytest

from planemesh.model.planes import SLA
from tests.proxy.proxy_harness import Backend, ProxyThread, free_port, log_line_for
from tests.proxy.test_proxy_http1 import raw_exchange


@pytest.fixture(scope="module")
def backend():
    with Backend() as be:
        yield be


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_connect_failure_retried_on_the_next_endpoint(backend) -> None:
    dead = free_port()
    sla = SLA(retries=1, retry_on=frozenset({"connect-failure"}))
    with ProxyThread([("127.0.0.1", dead), ("127.0.0.1", backend.port)], sla=sla) as px:
        results = [get(px.port, f"/r{i}") for i in range(4)]
        assert results == [(200, f"hello /r{i}\n".encode()) for i in range(4)]
        stats = px.proxy.stats
        # Round robin: every first pick is the dead endpoint, every retry takes the live one.
        assert stats.retries == 4 and stats.upstream_connect_failures == 4
        assert f'"127.0.0.1:{backend.port}"' in log_line_for(px, "/r0")


def test_without_retries_a_dead_endpoint_fails_fast(backend) -> None:
    dead = free_port()
    with ProxyThread([("127.0.0.1", dead), ("127.0.0.1", backend.port)]) as px:
        assert sorted(get(px.port, "/x")[0] for _ in range(2)) == [200, 503]
        assert px.proxy.stats.retries == 0


def test_5xx_retried_then_passed_through(backend) -> None:
    sla = SLA(retries=2, retry_on=frozenset({"5xx"}))
    with ProxyThread([("127.0.0.1", backend.port)], sla=sla) as px:
        assert get(px.port, "/fail-once/a") == (200, b"second\n")
        assert px.proxy.stats.retries == 1
        assert get(px.port, "/status/503") == (503, b"status\n")  # retries exhausted: the last answer
        assert px.proxy.stats.retries == 3


def test_5xx_not_retried_without_policy(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        assert get(px.port, "/fail-once/b") == (503, b"first\n")
        assert px.proxy.stats.retries == 0


def test_upstream_reset_before_headers_gives_503_uc(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        status, _ = get(px.port, "/reset")
        assert status == 503
        assert '" 503 UC ' in log_line_for(px, "/reset")
        assert get(px.port, "/after-reset")[0] == 200


def test_client_disconnect_is_logged_dc(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        with socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
            s.sendall(b"GET /slow/0.5 HTTP/1.1\r\nHost: t\r\n\r\n")
            time.sleep(0.1)
        line = log_line_for(px, "/slow/0.5")
        assert '" 0 DC ' in line
        deadline = time.monotonic() + 3
        while px.proxy.stats.requests_active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert px.proxy.stats.requests_active == 0 and px.proxy.stats.downstream_active == 0


def test_expect_100_continue_relayed(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px, \
            socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = s.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        s.sendall(b"hello")
        f = s.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 200 ")
        headers = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        assert f.read(int(headers["content-length"])) == b"hello"


def test_connect_method_is_refused_cleanly(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        reply = raw_exchange(px.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 403 "), reply  # CONNECT is off unless configured (test_tunnels.py)
        assert reply.endswith(b"CONNECT is not enabled on this listener\n"), reply
        assert get(px.port, "/still-fine")[0] == 200
