"""The proxy for real: a threaded http.server backend, the proxy on its own uvloop thread, real clients.

Everything is on loopback (127.0.0.1 / ::1).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import subprocess
import threading
import time
import uuid

import pytest

from planemesh.model.config import (
    DirectResponse,
    Redirect,
    Route,
    RouteAction,
    RouteMatch,
)
from planemesh.model.planes import SLA
from tests.proxy.proxy_harness import Backend, ProxyThread, big_body, free_port, log_line_for


@pytest.fixture(scope="module")
def backend():
    with Backend() as be:
        yield be


def raw_exchange(port: int, payload: bytes, *, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the proxy closes (or the timeout)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(payload)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            out += data
        return out


def read_response(sock_file) -> tuple[int, dict[str, str], bytes]:
    """Read one response from a socket file, framing by the headers only (no help from a library)."""
    status_line = sock_file.readline()
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = sock_file.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, b""


def test_keep_alive_many_requests_one_connection(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        for i in range(20):
            conn.request("GET", f"/k{i}")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read() == f"hello /k{i}\n".encode()
        conn.close()
        stats = px.proxy.stats
        assert stats.downstream_total == 1
        assert stats.requests_total == 20 and stats.responses[2] == 20
        assert stats.upstream_total == 1  # the pooled upstream connection was reused


def test_large_chunked_response_and_bodies_round_trip(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
        size = 6 * 1024 * 1024 + 17
        conn.request("GET", f"/big/{size}")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and resp.getheader("transfer-encoding") == "chunked"
        assert len(body) == size and hashlib.sha256(body).hexdigest() == resp.getheader("x-body-sha256")

        upload = os.urandom(3 * 1024 * 1024)
        conn.request("POST", "/echo", body=upload)  # content-length
        resp = conn.getresponse()
        echoed = resp.read()
        assert resp.status == 200 and hashlib.sha256(echoed).digest() == hashlib.sha256(upload).digest()

        pieces = [upload[i : i + 100_000] for i in range(0, len(upload), 100_000)]
        conn.request("PUT", "/echo", body=iter(pieces), encode_chunked=True)  # chunked request body
        resp = conn.getresponse()
        assert resp.status == 200 and hashlib.sha256(resp.read()).digest() == hashlib.sha256(upload).digest()
        conn.close()
        line = log_line_for(px, '"POST /echo HTTP/1.1" 200')
        assert f" {len(upload)} {len(upload)} " in line  # bytes received and sent


def test_request_id_added_or_kept_and_logged(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        conn.request("GET", "/headers")
        resp = conn.getresponse()
        added = resp.read().decode()
        assert str(uuid.UUID(added)) == added and uuid.UUID(added).version == 4
        conn.request("GET", "/headers", headers={"x-request-id": "client-chosen-id", "x-forwarded-for": "192.0.2.9"})
        resp = conn.getresponse()
        assert resp.read() == b"client-chosen-id"
        assert resp.getheader("x-seen-xff") == "192.0.2.9, 127.0.0.1"  # appended, not replaced
        conn.close()
        assert f'"{added}"' in log_line_for(px, added)
        line = log_line_for(px, "client-chosen-id")
        assert '"192.0.2.9, 127.0.0.1"' in line and line.endswith(" oam")


def test_hop_by_hop_headers_removed_and_forwarded_headers_added(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        conn.request("GET", "/hop", headers={
            "Connection": "keep-alive, X-Secret", "X-Secret": "s", "Keep-Alive": "timeout=5", "TE": "trailers",
            "Proxy-Connection": "keep-alive", "Upgrade": "h2c", "X-Kept": "yes",
        })
        assert conn.getresponse().read() == b"hello /hop\n"
        conn.close()
    _, _, seen = next(s for s in reversed(backend.seen) if s[1] == "/hop")
    for gone in ("x-secret", "keep-alive", "te", "proxy-connection", "upgrade"):
        assert gone not in seen, gone
    assert seen.get("connection") in (None, "keep-alive")
    assert seen["x-kept"] == "yes" and seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"


def test_malformed_request_gets_400_and_close_while_others_are_served(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        good = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        good.request("GET", "/before")
        assert good.getresponse().read() == b"hello /before\n"
        for garbage, status in ((b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
                                (b"\x16\x03\x01\x00\xa5garbage\r\n\r\n", 400), (b"GET / HTTP/9.9\r\n\r\n", 505)):
            reply = raw_exchange(px.port, garbage)
            assert reply.startswith(b"HTTP/1.1 %d " % status), reply
            assert b"connection: close" in reply
        good.request("GET", "/after")  # the same keep-alive connection is still fine
        assert good.getresponse().read() == b"hello /after\n"
        good.close()
        assert " 400 DPE " in log_line_for(px, " 400 DPE ")


@pytest.mark.parametrize("payload", [
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
])
def test_smuggling_attempts_get_400(backend, payload: bytes) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        reply = raw_exchange(px.port, payload)
        assert reply.startswith(b"HTTP/1.1 400 "), reply
        assert px.proxy.stats.requests_total == 0  # nothing reached the upstream


def test_oversized_header_section_gets_431(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        many = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
        reply = raw_exchange(px.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:100]
        one_huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"v" * 100_000  # never finished
        reply = raw_exchange(px.port, one_huge)
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:100]


def test_slow_headers_get_408_and_other_clients_are_served(backend) -> None:
    """Slowloris: a head trickled a byte at a time is cut off when the plane's request_headers_timeout_s runs
    out, however active the trickle keeps the connection; a normal client on the same proxy is unaffected."""
    with ProxyThread([("127.0.0.1", backend.port)], sla=SLA(request_headers_timeout_s=0.5)) as px:
        slow = socket.create_connection(("127.0.0.1", px.port), timeout=5)
        started = time.monotonic()
        try:
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"v" * 100:
                slow.sendall(bytes([byte]))
                time.sleep(0.02)
                if byte == ord("H"):  # meanwhile, somebody else's requests go through at once
                    conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
                    conn.request("GET", "/fast")
                    assert conn.getresponse().status == 200
                    conn.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = slow.recv(4096)
        slow.close()
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:100]
        assert 0.5 <= time.monotonic() - started < 3.0
        assert px.proxy.stats.requests_total == 2  # only the fast ones ("H"TTP and "H"ost) went upstream
        assert '" 408 DPE ' in log_line_for(px, '" 408 ')  # not "408": ports and ids contain it too


def test_upstream_down_gives_503_uf() -> None:
    dead = free_port()  # nothing listens there
    with ProxyThread([("127.0.0.1", dead)]) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        conn.request("GET", "/down")
        resp = conn.getresponse()
        assert resp.status == 503 and resp.read()
        conn.request("GET", "/down-again")  # the client connection survives the local reply
        assert conn.getresponse().status == 503
        conn.close()
        line = log_line_for(px, "/down ")
        assert '" 503 UF ' in line and f'"127.0.0.1:{dead}"' in line
        assert px.proxy.stats.upstream_connect_failures == 2


def test_slow_upstream_gives_504_ut(backend) -> None:
    routes = (Route(action=RouteAction(cluster="backend", timeout_s=0.3)),)
    with ProxyThread([("127.0.0.1", backend.port)], routes=routes) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        t0 = time.monotonic()
        conn.request("GET", "/slow/2")
        resp = conn.getresponse()
        assert resp.status == 504 and resp.read() == b"upstream request timeout\n"
        assert 0.25 < time.monotonic() - t0 < 1.5
        conn.request("GET", "/fast")  # still usable after the timeout, on a fresh upstream connection
        assert conn.getresponse().read() == b"hello /fast\n"
        conn.close()
        assert '" 504 UT ' in log_line_for(px, "/slow/2")


def test_head_204_304_framing_on_one_connection(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px, \
            socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
        f = s.makefile("rb")
        s.sendall(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = read_response(f)
        assert status == 200 and headers["content-length"] == "1234" and "transfer-encoding" not in headers
        for path, code in (("/204", 204), ("/304", 304)):
            s.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode())
            status, headers, _ = read_response(f)
            assert status == code and "transfer-encoding" not in headers
            assert code == 304 or "content-length" not in headers
        # If any of the above had leaked a body or framing, this response would be misread.
        s.sendall(b"GET /last HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = read_response(f)
        assert status == 200 and f.read(int(headers["content-length"])) == b"hello /last\n"


def test_pipelined_requests_answered_in_order(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px, \
            socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
        s.sendall(b"".join(b"GET /p%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(5)))
        f = s.makefile("rb")
        for i in range(5):
            status, headers, _ = read_response(f)
            assert status == 200 and f.read(int(headers["content-length"])) == b"hello /p%d\n" % i


def test_http10_client_gets_close_delimited_or_length(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        reply = raw_exchange(px.port, b"GET /big/100000 HTTP/1.0\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and b"transfer-encoding" not in head.lower()  # answered in 1.0
        assert body == big_body(100000)


def test_curl_through_the_proxy_v6(tmp_path) -> None:
    with Backend("::1") as be, ProxyThread([("::1", be.port)], host="::1") as px:
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "5", "-o", str(tmp_path / "first"), "-o", str(tmp_path / "body"),
             "-w", "%{http_code}",
             f"http://[::1]:{px.port}/via-curl", f"http://[::1]:{px.port}/again"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        assert out.stdout == "200200"
        assert (tmp_path / "body").read_bytes() == b"hello /again\n"
        assert f'"[::1]:{be.port}"' in log_line_for(px, "/via-curl")


def test_direct_response_redirect_and_no_route(backend) -> None:
    routes = (
        Route(match=RouteMatch(prefix="/direct"), action=None, direct_response=DirectResponse(418, b"teapot\n")),
        Route(match=RouteMatch(prefix="/old"), action=None, redirect=Redirect(path="/new", code=308)),
        Route(match=RouteMatch(prefix="/api"), action=RouteAction(cluster="backend")),
    )
    with ProxyThread([("127.0.0.1", backend.port)], routes=routes) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        conn.request("GET", "/direct")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (418, b"teapot\n")
        conn.request("GET", "/old")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 308 and resp.getheader("location") == f"http://127.0.0.1:{px.port}/new"
        conn.request("GET", "/nowhere")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404
        conn.request("GET", "/api/x")
        assert conn.getresponse().read() == b"hello /api/x\n"
        conn.close()
        assert '" 404 NR ' in log_line_for(px, "/nowhere")


def test_overload_answers_at_once(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)], sla=SLA(max_requests=1)) as px:
        slow = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        slow.request("GET", "/slow/0.5")
        time.sleep(0.1)  # the slow request is in flight
        t0 = time.monotonic()
        other = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        other.request("GET", "/x")
        resp = other.getresponse()
        resp.read()
        assert resp.status == 503 and resp.getheader("x-planemesh-overloaded") == "requests"
        assert time.monotonic() - t0 < 0.3  # at once, not after the slow one
        assert slow.getresponse().status == 200
        slow.close()
        other.close()
        assert '" 503 UO ' in log_line_for(px, '"GET /x ')


def test_max_connections(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)], sla=SLA(max_connections=1)) as px:
        first = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        first.request("GET", "/one")
        assert first.getresponse().read() == b"hello /one\n"
        reply = raw_exchange(px.port, b"GET /two HTTP/1.1\r\nHost: t\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503 ") and b"x-planemesh-overloaded: connections" in reply
        first.close()


def test_rate_limit_429_with_headers(backend) -> None:
    clock = [1000.0]
    with ProxyThread([("127.0.0.1", backend.port)], sla=SLA(rate_limit_rps=1, rate_limit_burst=2),
                     clock=lambda: clock[0]) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        statuses = []
        for _ in range(3):
            conn.request("GET", "/rl")
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        assert statuses == [200, 200, 429]
        assert resp.getheader("retry-after") == "1" and resp.getheader("x-ratelimit-limit") == "2"
        clock[0] += 1.0  # one token back, without sleeping
        conn.request("GET", "/rl")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        conn.close()
        assert '" 429 RL ' in log_line_for(px, '" 429 RL ')


def test_update_swaps_routes_atomically(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        conn.request("GET", "/u")
        assert conn.getresponse().read() == b"hello /u\n"
        from dataclasses import replace
        from types import MappingProxyType

        rc = px.snapshot.routes["rc"]
        vh = replace(rc.virtual_hosts[0], routes=(
            Route(action=None, direct_response=DirectResponse(200, b"new config\n")),))
        new = replace(px.snapshot, version="t2", routes=MappingProxyType({"rc": replace(rc, virtual_hosts=(vh,))}))
        px.call(px.proxy.update, new)
        conn.request("GET", "/u")  # same keep-alive connection, new routes
        assert conn.getresponse().read() == b"new config\n"
        conn.close()


def test_drain_finishes_in_flight_requests(backend) -> None:
    px = ProxyThread([("127.0.0.1", backend.port)])
    with px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        result: dict[str, object] = {}

        def slow() -> None:
            conn.request("GET", "/slow/0.4")
            resp = conn.getresponse()
            result["status"], result["body"] = resp.status, resp.read()
            result["connection"] = resp.getheader("connection")

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.15)
    # __exit__ drained: the in-flight request completed, with connection: close
    t.join(timeout=5)
    assert result == {"status": 200, "body": b"slow\n", "connection": "close"}
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", px.port), timeout=1).close()


def test_access_log_line_format(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        conn.request("GET", "/fmt?x=1", headers={"User-Agent": "planemesh-test"})
        conn.getresponse().read()
        conn.close()
        line = log_line_for(px, "/fmt")
        pattern = (r'\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "GET /fmt\?x=1 HTTP/1\.1" 200 - 0 15 \d+ \d+ '
                   r'"127\.0\.0\.1" "planemesh-test" "[0-9a-f-]{36}" "127\.0\.0\.1:\d+" "127\.0\.0\.1:\d+" oam')
        assert re.fullmatch(pattern, line), line
