"""HTTP/1.1 conformance and hardening through the real proxy (issue 11, findings 6, 8, 10-13): raw-socket
clients for exact bytes, a scripted raw upstream for responses no well-behaved server sends."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from dataclasses import replace

import pytest

from planemesh.model.config import DirectResponse, HeaderValue, Route, RouteAction, VirtualHost
from planemesh.model.planes import SLA
from tests.proxy.proxy_harness import Backend, ProxyThread
from tests.support.servers import AcceptLoop


@pytest.fixture(scope="module")
def backend():
    with Backend() as be:
        yield be


class ScriptedUpstream:
    """A keep-alive HTTP/1.1 upstream answering each request with the raw bytes `script[path]` (default: a
    200 echoing the path). Reads Content-Length bodies; never sends 100 Continue. Records request heads."""

    def __init__(self, script: dict[str, bytes] | None = None) -> None:
        self.script = script or {}
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.loop = AcceptLoop(socket.create_server(("127.0.0.1", 0)), self._one)
        self.port = self.loop.port

    def __enter__(self) -> ScriptedUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.close()

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError, ValueError):
            f = conn.makefile("rb")
            while True:
                head = b""
                while (line := f.readline()) not in (b"\r\n", b""):
                    head += line
                if not head:
                    return
                self.heads.append(head)
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                self.bodies.append(f.read(int(m.group(1))) if m else b"")
                path = head.split(b" ")[1].decode()
                body = f"hello {path}\n".encode()
                default = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
                conn.sendall(self.script.get(path, default))


def read_until_closed(s: socket.socket, timeout: float = 5.0) -> bytes:
    s.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                break
            out += data
    return out


def exchange(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return read_until_closed(s, timeout)


def statuses(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


# ---- finding 6: absolute-form targets ------------------------------------------------------------------------


def test_absolute_form_authority_replaces_host_for_routing_and_upstream() -> None:
    with ScriptedUpstream() as up, ProxyThread([("127.0.0.1", up.port)]) as px:
        rc = px.snapshot.routes["rc"]
        admin = VirtualHost(name="admin", domains=("admin.example",),
                            routes=(Route(action=None, direct_response=DirectResponse(403, b"admin only\n")),))
        px.snapshot = replace(px.snapshot, routes={"rc": replace(rc, virtual_hosts=(admin, *rc.virtual_hosts))})
        px.call(px.proxy.update, px.snapshot)
        # Host says public, the absolute-form authority says admin: the authority wins (RFC 9112 3.2.2).
        reply = exchange(px.port, b"GET http://admin.example/secret HTTP/1.1\r\nHost: public.example\r\n"
                                  b"Connection: close\r\n\r\n")
        assert statuses(reply) == [403], reply
        assert not up.heads  # nothing reached the upstream
        reply = exchange(px.port, b"GET HTTP://Public.Example:8080/y?q=1#frag HTTP/1.1\r\nHost: other.example\r\n"
                                  b"Connection: close\r\n\r\n")
        assert statuses(reply) == [200], reply
        head = up.heads[-1]
        assert head.startswith(b"GET /y?q=1 HTTP/1.1\r\n"), head  # origin-form upstream, fragment gone
        assert re.findall(rb"(?im)^host: (.*)\r$", head) == [b"Public.Example:8080"], head
        reply = exchange(px.port, b"GET http://public.example HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert statuses(reply) == [200] and up.heads[-1].startswith(b"GET / HTTP/1.1\r\n"), up.heads[-1]


# ---- finding 8: bounded buffering, back-pressure ---------------------------------------------------------------


def _push_until_stalled(s: socket.socket, limit: int, stall_s: float = 2.0) -> int:
    """Send up to `limit` bytes; stop once the peer has not taken any for `stall_s`. Returns bytes sent."""
    s.settimeout(stall_s)
    block = b"x" * 65536
    sent = 0
    with contextlib.suppress(TimeoutError, BlockingIOError, ConnectionResetError, BrokenPipeError):
        while sent < limit:
            sent += s.send(block)
    return sent


def test_h2c_upgrade_body_bounded_while_upstream_connect_pending() -> None:
    # An upstream whose accept queue is full: the proxy's connect hangs (SYNs dropped) for connect_timeout_s.
    black = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = []
    with contextlib.suppress(OSError):
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(black.getsockname())
            fillers.append(f)
    time.sleep(0.3)
    total = 64 << 20
    try:
        with ProxyThread([black.getsockname()], sla=SLA(connect_timeout_s=20.0)) as px:
            s = socket.create_connection(("127.0.0.1", px.port), timeout=5)
            s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                      b"HTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: %d\r\n\r\n" % total)
            sent = _push_until_stalled(s, total)
            # Old code read all 64 MiB into memory; now reading stops at buffer_limit_bytes (1 MiB) plus
            # what the two kernel socket buffers hold.
            assert sent < 24 << 20, sent
            s.close()
    finally:
        for f in fillers:
            f.close()
        black.close()


def test_pipelined_requests_wait_for_a_slow_reader(backend) -> None:
    """A client that pipelines many downloads and reads nothing: once its socket is full the proxy stops
    reading the upstream (a guard: this already held before issue 11)."""
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        s = socket.create_connection(("127.0.0.1", px.port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /big/50000 HTTP/1.1\r\nHost: a\r\n\r\n" * 400)  # 20 MB of responses
        time.sleep(4)
        queued = px.call(lambda: max(ds.transport.get_write_buffer_size() for ds in px.proxy.connections))
        assert queued < 2 << 20, queued
        s.close()


# ---- finding 10: a bodiless response that carries a body ---------------------------------------------------------


@pytest.mark.parametrize("bad", [
    b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\nhello",
    b"HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil",
])
def test_bodiless_response_with_a_body_gets_502_and_the_next_request_is_served(bad: bytes) -> None:
    with ScriptedUpstream({"/bad": bad}) as up, ProxyThread([("127.0.0.1", up.port)]) as px:
        t0 = time.monotonic()
        reply = exchange(px.port, b"GET /bad HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n"
                                  b"Connection: close\r\n\r\n", timeout=10)
        took = time.monotonic() - t0
        st = statuses(reply)
        if bad.count(b"HTTP/1.1") == 2:  # a clean 204, then unsolicited bytes: 204 relayed, connection not reused
            assert st == [204, 200], reply
        else:
            assert st == [502, 200], reply
        assert reply.endswith(b"hello /next\n") and b"evil" not in reply, reply
        assert took < 3, took


def test_head_response_with_a_body_is_not_read_as_the_next_response() -> None:
    bad = b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil"
    with ScriptedUpstream({"/h": bad}) as up, ProxyThread([("127.0.0.1", up.port)]) as px:
        reply = exchange(px.port, b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n"
                                  b"Connection: close\r\n\r\n", timeout=10)
        time.sleep(0.2)
        idle = px.call(lambda: sum(len(v) for v in px.proxy.pool.idle.values()))
        assert idle == 1, idle  # the connection that answered HEAD with a body is not kept (/next's is)
    assert statuses(reply) == [200, 200], reply
    assert b"content-length: 40\r\n" in reply and reply.endswith(b"hello /next\n") and b"evil" not in reply, reply


# ---- finding 11: a good pipelined request before a malformed one -------------------------------------------------


def test_pipelined_good_then_malformed_answers_both_in_order(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        reply = exchange(px.port, b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n"
                                  b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        assert statuses(reply) == [200, 200, 400], reply
        assert b"hello /first\n" in reply and b"hello /second\n" in reply
        assert reply.index(b"hello /second") < reply.index(b" 400 ")
        assert reply.endswith(b"bad request\n")  # then the connection closed


# ---- finding 12: Connection cannot strip what the proxy adds -----------------------------------------------------


def test_connection_header_cannot_strip_proxy_added_headers(backend) -> None:
    route = Route(action=RouteAction(cluster="backend"),
                  request_headers_to_add=(HeaderValue("x-added", "yes"),))
    with ProxyThread([("127.0.0.1", backend.port)], routes=(route,)) as px:
        reply = exchange(px.port, b"GET /conn12 HTTP/1.1\r\nHost: a.example\r\nx-request-id: client-id\r\n"
                                  b"X-Private: p\r\nX-Forwarded-For: 192.0.2.1\r\n"
                                  b"Connection: close, x-added, host, x-request-id, x-forwarded-for, x-private\r\n\r\n")
        assert statuses(reply) == [200], reply
    _, _, seen = next(s for s in reversed(backend.seen) if s[1] == "/conn12")
    assert seen["host"] == "a.example"
    assert seen["x-added"] == "yes"
    assert seen.get("x-request-id") not in (None, "", "client-id")  # the client's was hop-by-hop: a fresh one
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the client's hop-by-hop XFF is gone, the proxy's is there
    assert "x-private" not in seen


def test_upstream_connection_header_cannot_strip_route_added_response_headers() -> None:
    resp = (b"HTTP/1.1 200 OK\r\nconnection: x-resp-added, x-up-private\r\nx-up-private: 1\r\n"
            b"content-length: 2\r\n\r\nok")
    route = Route(action=RouteAction(cluster="backend"), response_headers_to_add=(HeaderValue("x-resp-added", "yes"),))
    with ScriptedUpstream({"/r": resp}) as up, ProxyThread([("127.0.0.1", up.port)], routes=(route,)) as px:
        reply = exchange(px.port, b"GET /r HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert statuses(reply) == [200] and b"x-resp-added: yes\r\n" in reply, reply
    assert b"x-up-private" not in reply


def test_too_many_pipelined_requests_answered_then_503() -> None:
    with ScriptedUpstream() as up, ProxyThread([("127.0.0.1", up.port)]) as px:
        reply = exchange(px.port, b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(300)))
    st = statuses(reply)
    # The one being answered plus MAX_PIPELINED queued get their responses, in order; then 503 and close.
    assert st == [200] * 129 + [503], (len(st), st[-3:])
    assert reply.endswith(b"too many pipelined requests\n") and b"hello /p128\n" in reply


# ---- finding 13: conformance -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a:b\r\n\r\n", 400),
    (b"GET http://a@b/ HTTP/1.1\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/0.9\r\nHost: a\r\nKeep-Alive: 5\r\n\r\n", 505),  # its version read, not assumed (not kept alive)
    (b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
])
def test_bad_request_heads_refused(backend, request_bytes: bytes, status: int) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        before = len(backend.seen)
        reply = exchange(px.port, request_bytes)
        assert statuses(reply) == [status], reply
        assert b"connection: close" in reply
        assert len(backend.seen) == before  # nothing went upstream


def test_valid_hosts_accepted(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        for host in (b"a.example", b"a.example:8080", b"[::1]:80", b"127.0.0.1", b"xn--bcher-kva.example"):
            reply = exchange(px.port, b"GET / HTTP/1.1\r\nHost: %b\r\nConnection: close\r\n\r\n" % host)
            assert statuses(reply) == [200], (host, reply)


def test_fragment_stripped(backend) -> None:
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        reply = exchange(px.port, b"GET /frag?x=1#secret HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert reply.endswith(b"hello /frag?x=1\n"), reply
    assert backend.seen[-1][1] == "/frag?x=1"


def test_http10_client_answered_in_http10() -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    with ScriptedUpstream({"/chunked": chunked}) as up, ProxyThread([("127.0.0.1", up.port)]) as px:
        reply = exchange(px.port, b"GET /chunked HTTP/1.0\r\n\r\n")  # no Host: fine in 1.0
        assert reply.startswith(b"HTTP/1.0 200 "), reply
        assert b"transfer-encoding" not in reply.lower() and reply.endswith(b"\r\n\r\nabc"), reply
        # Keep-alive only when asked for, and said so.
        with socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
            s.sendall(b"GET /one HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            time.sleep(0.5)
            first = s.recv(65536)
            assert first.startswith(b"HTTP/1.0 200 ") and b"connection: keep-alive" in first.lower(), first
            s.sendall(b"GET /two HTTP/1.0\r\n\r\n")
            rest = read_until_closed(s)
            assert rest.startswith(b"HTTP/1.0 200 ") and rest.endswith(b"hello /two\n"), rest
        # Local replies too; chunked request bodies are not HTTP/1.0.
        reply = exchange(px.port, b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.") and statuses(reply) == [400], reply
        assert all(b"HTTP/1.1" in h for h in up.heads)  # the proxy's own upstream connection speaks 1.1


def test_upstream_with_too_many_header_fields_gets_502() -> None:
    many = b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(20000)) + b"content-length: 2\r\n\r\nok"
    with ScriptedUpstream({"/many": many}) as up, ProxyThread([("127.0.0.1", up.port)]) as px:
        reply = exchange(px.port, b"GET /many HTTP/1.1\r\nHost: a\r\n\r\nGET /fine HTTP/1.1\r\nHost: a\r\n"
                                  b"Connection: close\r\n\r\n")
        assert statuses(reply) == [502, 200], reply[:300]
        assert b"x-h150" not in reply


def test_expect_100_continue_answered_when_routed() -> None:
    with ScriptedUpstream() as up, ProxyThread([("127.0.0.1", up.port)]) as px:
        with socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
            s.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            s.settimeout(3)
            interim = s.recv(65536)  # the upstream never sends 100: the proxy does, once routed
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n", interim
            s.sendall(b"hello")
            s.sendall(b"GET /end HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            rest = read_until_closed(s)
        assert statuses(rest) == [200, 200] and b"100 Continue" not in rest, rest
        assert up.bodies[0] == b"hello"
        assert b"expect" not in up.heads[0].lower()  # answered here: not forwarded


def test_listen_backlog_follows_somaxconn(backend) -> None:
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    with ProxyThread([("127.0.0.1", backend.port)]) as px:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{px.port}"], capture_output=True, text=True, check=True)
        backlog = int(out.stdout.split()[2])  # State Recv-Q Send-Q: Send-Q of a listener is its backlog
        assert backlog == somaxconn, out.stdout
