"""WebSocket upgrades and CONNECT tunnels through the proxy, with real sockets on loopback.

A real RFC 6455 server and client (labs/ws_server.py) on either side of the proxy; CONNECT to a TCP echo
server, byte-exact, with half-close; refusals and malformed requests get clear 4xx answers.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import socketserver
import threading
import time
import weakref
from dataclasses import replace

import pytest

from planemesh.labs.ws_server import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    WebSocketClient,
    WebSocketServer,
    accept_key,
    close_status,
    encode_frame,
)
from planemesh.model.config import (
    Cluster,
    ClusterKind,
    Endpoint,
    Route,
    RouteAction,
    RouteMatch,
    UpgradeConfig,
)
from planemesh.model.planes import SLA
from tests.proxy.proxy_harness import ProxyThread, free_port, log_line_for
from tests.support.waiting import eventually as wait_for

CONNECT_ROUTE = Route(match=RouteMatch(prefix=None, connect=True),
                      action=RouteAction(upgrades=(UpgradeConfig("connect"),)))  # fmt: skip
WS_OFF = UpgradeConfig("websocket", enabled=False)


@pytest.fixture(scope="module")
def ws_server():
    with WebSocketServer() as server:
        yield server


class EchoHandler(socketserver.BaseRequestHandler):
    """Echoes every byte until the client's FIN, then half-closes: the tunnel must carry both FINs."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(1 << 20):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def echo_port():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def with_listener_upgrades(px: ProxyThread, upgrades: tuple[UpgradeConfig, ...]) -> ProxyThread:
    listener = replace(px.snapshot.listeners[0], upgrades=upgrades)
    px.snapshot = replace(px.snapshot, listeners=(listener,))
    if px.thread.is_alive():
        px.call(px.proxy.update, px.snapshot)
    else:
        px.proxy.update(px.snapshot)
    return px


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(1 << 20):
        out += data
    return bytes(out)


# Bytes read past a response on a socket (pipelined responses may arrive in one segment): the next one's start.
_AFTER: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a content-length body, read with no help from a library. What follows its body in the
    same read is kept for the next call on the socket."""
    buf = _AFTER.pop(sock, b"")
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"closed before a response head: {buf!r}"
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        body += sock.recv(65536)
    if "content-length" in headers and len(body) > length:
        body, _AFTER[sock] = body[:length], body[length:]
    return int(lines[0].split(" ")[1]), headers, body


# ---- WebSocket --------------------------------------------------------------------------------------------


def test_websocket_echo_through_proxy(ws_server: WebSocketServer) -> None:
    with ProxyThread([("127.0.0.1", ws_server.port)]) as px:
        ws = WebSocketClient.connect("127.0.0.1", px.port)
        status, headers, _ = ws.handshake(f"127.0.0.1:{px.port}", "/chat?room=1")
        assert status == 101 and headers["upgrade"].lower() == "websocket"
        path, seen = ws_server.seen[-1]
        assert path == "/chat?room=1" and seen["upgrade"] == "websocket" and "upgrade" in seen["connection"].lower()
        assert len(seen["x-request-id"]) == 36 and seen["x-forwarded-for"] == "127.0.0.1"
        ws.send("hello")
        assert ws.recv() == (TEXT, b"hello")
        ws.send(b"\x00\xffbinary")
        assert ws.recv() == (BINARY, b"\x00\xffbinary")
        big = os.urandom(3 << 20)
        ws.send(big, fragment=100_000)  # 31 fragments, reassembled by the server, echoed as one frame
        opcode, echoed = ws.recv()
        assert opcode == BINARY and hashlib.sha256(echoed).digest() == hashlib.sha256(big).digest()
        ws.send(b"are you there", opcode=PING)
        assert ws.recv() == (PONG, b"are you there")
        assert ws.close(1000, b"done") == (1000, b"")
        assert ws.ended()  # the server closed its side: the proxy passed the FIN on
        ws.sock.close()
        line = log_line_for(px, '"GET /chat?room=1 HTTP/1.1" 101')
        bytes_rx, bytes_tx = (int(v) for v in line.split(" 101 ")[1].split()[1:3])
        assert bytes_rx > 3 << 20 and bytes_tx > 3 << 20, line
        assert seen["x-request-id"] in line
        stats = px.proxy.stats
        # Both connections were the tunnel's; their bookkeeping ends with it and nothing went to the pool.
        assert wait_for(lambda: stats.downstream_active == 0 and stats.upstream_active == 0), px.call(stats.as_dict)
        assert stats.requests_active == 0 and not any(px.proxy.pool.idle.values())


def test_upgrade_pipelined_behind_a_request_with_an_early_frame(ws_server: WebSocketServer) -> None:
    with ProxyThread([("127.0.0.1", ws_server.port)]) as px, socket.create_connection(("127.0.0.1", px.port)) as s:
        s.settimeout(5)
        key = base64.b64encode(os.urandom(16))
        s.sendall(
            b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
            + encode_frame(TEXT, b"sent before the 101", mask=True)
        )  # fmt: skip
        first = s.makefile("rb", buffering=0)  # unbuffered: what follows each head stays in the socket
        heads = []
        for _ in range(2):
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += first.read(1)
            heads.append(head)
            if head.startswith(b"HTTP/1.1 200 "):
                assert first.read(len(b"plain /first\n")) == b"plain /first\n"
        assert heads[0].startswith(b"HTTP/1.1 200 ")
        assert heads[1].startswith(b"HTTP/1.1 101 ") and accept_key(key) in heads[1]
        assert WebSocketClient(s).recv() == (TEXT, b"sent before the 101")


def test_websocket_server_initiated_close(ws_server: WebSocketServer) -> None:
    with ProxyThread([("127.0.0.1", ws_server.port)]) as px:
        ws = WebSocketClient.connect("127.0.0.1", px.port)
        assert ws.handshake("ws.local")[0] == 101
        ws.send("close-please")
        opcode, payload = ws.recv()
        assert opcode == CLOSE and close_status(payload) == (1000, b"bye")
        ws.sock.sendall(b"\x88\x82" + b"\x00\x00\x00\x00" + b"\x03\xe8")  # the client's close reply (masked, 1000)
        assert ws.ended()
        ws.sock.close()
        assert '"ws.local"' in log_line_for(px, '"GET / HTTP/1.1" 101')


def test_upgrade_refused_by_configuration_keeps_the_connection_http(ws_server: WebSocketServer) -> None:
    refused_route = Route(match=RouteMatch(prefix="/no-ws"), action=RouteAction(cluster="backend", upgrades=(WS_OFF,)))
    routes = (refused_route, Route(action=RouteAction(cluster="backend")))
    with ProxyThread([("127.0.0.1", ws_server.port)], routes=routes) as px:
        ws = WebSocketClient.connect("127.0.0.1", px.port)
        status, _, body = ws.handshake("a", "/no-ws/x")
        assert (status, body) == (403, b"upgrade to websocket is not allowed on this route\n")
        ws.sock.sendall(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")  # same connection, plain HTTP again
        assert read_response(ws.sock)[::2] == (200, b"plain /after\n")
        assert WebSocketClient.connect("127.0.0.1", px.port).handshake("a", "/other")[0] == 101
        # A listener without websocket in its upgrades (Envoy's default for an HCM) refuses everywhere...
        with_listener_upgrades(px, ())
        assert WebSocketClient.connect("127.0.0.1", px.port).handshake("a", "/other")[0] == 403
        # ...unless the route enables it (route over listener, as Envoy).
        on = Route(action=RouteAction(cluster="backend", upgrades=(UpgradeConfig("websocket"),)))
        px.snapshot = replace(px.snapshot, routes={"rc": replace(px.snapshot.routes["rc"], virtual_hosts=(
            replace(px.snapshot.routes["rc"].virtual_hosts[0], routes=(on,)),))})  # fmt: skip
        px.call(px.proxy.update, px.snapshot)
        assert WebSocketClient.connect("127.0.0.1", px.port).handshake("a", "/other")[0] == 101


def test_non_101_answer_is_an_ordinary_response(ws_server: WebSocketServer) -> None:
    with ProxyThread([("127.0.0.1", ws_server.port)]) as px:
        ws = WebSocketClient.connect("127.0.0.1", px.port)
        status, headers, body = ws.handshake("a", "/refuse")
        assert (status, body) == (403, b"refused\n") and "upgrade" not in headers
        ws.sock.sendall(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(ws.sock)[::2] == (200, b"plain /next\n")
        # The connection that carried the upgrade request was closed, not pooled (the next request used another).
        assert wait_for(lambda: px.proxy.stats.upstream_active == 1 and px.proxy.stats.upstream_total == 2)


def test_bad_switching_protocols_from_upstream_is_502() -> None:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\n\r\nnot a websocket")  # no Upgrade/Connection
            conn.recv(65536)

    threading.Thread(target=serve, daemon=True).start()
    with srv, ProxyThread([("127.0.0.1", srv.getsockname()[1])]) as px:
        ws = WebSocketClient.connect("127.0.0.1", px.port)
        assert ws.handshake("a")[::2] == (502, b"upstream protocol error\n")
        assert " 502 UPE " in log_line_for(px, " 502 UPE ")


def test_tunnel_idle_timeout_and_drain_close_tunnels(ws_server: WebSocketServer) -> None:
    with ProxyThread([("127.0.0.1", ws_server.port)], sla=SLA(idle_timeout_s=0.3)) as px:
        ws = WebSocketClient.connect("127.0.0.1", px.port)
        assert ws.handshake("a")[0] == 101
        started = time.monotonic()
        assert ws.recv() == (CLOSE, b"")  # nothing moved: closed by the proxy after 1-2 idle periods
        assert 0.25 < time.monotonic() - started < 2.0
        kept = WebSocketClient.connect("127.0.0.1", px.port)
        assert kept.handshake("a")[0] == 101
    # Leaving the block drains the proxy: the tunnel still open is closed.
    kept.sock.settimeout(5)
    assert kept.recv() == (CLOSE, b"")


def test_h2c_upgrade_request_with_body_is_forwarded_as_plain_request(backend_port: int) -> None:
    """curl --http2 on http:// sends `Upgrade: h2c` with its POST body: never a tunnel (as Envoy)."""
    with ProxyThread([("127.0.0.1", backend_port)]) as px, socket.create_connection(("127.0.0.1", px.port)) as s:
        s.settimeout(5)
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                  b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\nhello"
                  b"GET /then HTTP/1.1\r\nHost: a\r\n\r\n")  # fmt: skip
        status, headers, body = read_response(s)
        assert (status, body) == (200, b"hello") and "upgrade" not in headers
        assert read_response(s)[::2] == (200, b"hello /then\n")


@pytest.fixture(scope="module")
def backend_port():
    from tests.proxy.proxy_harness import Backend

    with Backend() as be:
        yield be.port


# ---- CONNECT ----------------------------------------------------------------------------------------------


def connect(port: int, target: str, early: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + early)
    return s


def connect_to_cluster(name: str, *endpoints: tuple[str, int]) -> tuple[Route, dict[str, Cluster]]:
    route = Route(match=RouteMatch(prefix=None, connect=True),
                  action=RouteAction(cluster=name, upgrades=(UpgradeConfig("connect"),)))  # fmt: skip
    return route, {name: Cluster(name=name, kind=ClusterKind.STATIC, endpoints=tuple(Endpoint(*e) for e in endpoints))}


def test_connect_tunnel_is_byte_exact_with_half_close(echo_port: int) -> None:
    route, clusters = connect_to_cluster("echo", ("127.0.0.1", echo_port))
    with ProxyThread([], routes=(route,), clusters=clusters) as px:
        payload = os.urandom(8 << 20)
        s = connect(px.port, f"127.0.0.1:{echo_port}", early=payload[:1000])  # bytes before the 200 are kept
        assert s.recv(len(b"HTTP/1.1 200 Connection established\r\n\r\n")) == (
            b"HTTP/1.1 200 Connection established\r\n\r\n"
        )
        sender = threading.Thread(target=lambda: (s.sendall(payload[1000:]), s.shutdown(socket.SHUT_WR)))
        sender.start()
        echoed = read_all(s)  # the echo server's FIN arrives only after our half-close went through
        sender.join()
        s.close()
        assert len(echoed) == len(payload) and echoed == payload
        line = log_line_for(px, f'"CONNECT 127.0.0.1:{echo_port} HTTP/1.1" 200')
        assert f" 200 - {len(payload)} {len(payload)} " in line, line
        assert f'"127.0.0.1:{echo_port}"' in line  # upstream host
        assert wait_for(lambda: px.proxy.stats.downstream_active == 0 and px.proxy.stats.upstream_active == 0)


def test_connect_to_a_cluster_goes_to_its_endpoint(echo_port: int) -> None:
    route = Route(match=RouteMatch(prefix=None, connect=True),
                  action=RouteAction(cluster="echo", upgrades=(UpgradeConfig("connect"),)))  # fmt: skip
    echo = Cluster(name="echo", kind=ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", echo_port),))
    with ProxyThread([], routes=(route,), clusters={"echo": echo}) as px:
        s = connect(px.port, "db.example:5432")  # a name nobody resolves: the route decides
        assert read_response(s)[0] == 200
        s.sendall(b"ping")
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b"ping"
        s.close()


def test_connect_refused_or_failing_gets_clear_answers(echo_port: int) -> None:
    with ProxyThread([]) as px:  # default listener: CONNECT not enabled
        assert read_response(connect(px.port, f"127.0.0.1:{echo_port}"))[::2] == (
            403, b"CONNECT is not enabled on this listener\n")  # fmt: skip
    with with_listener_upgrades(ProxyThread([]), (UpgradeConfig("connect"),)) as px:  # enabled, but no route
        status, _, _ = read_response(connect(px.port, f"127.0.0.1:{echo_port}"))
        assert status == 404 and " 404 NR " in log_line_for(px, " 404 NR ")
    off = replace(CONNECT_ROUTE, action=RouteAction(upgrades=(UpgradeConfig("connect", enabled=False),)))
    with with_listener_upgrades(ProxyThread([], routes=(off,)), (UpgradeConfig("connect"),)) as px:
        assert read_response(connect(px.port, f"127.0.0.1:{echo_port}"))[::2] == (
            403, b"CONNECT is not allowed on this route\n")  # fmt: skip
    dead = free_port()
    route, clusters = connect_to_cluster("dead", ("127.0.0.1", dead))
    with ProxyThread([], routes=(route,), clusters=clusters) as px:
        status, headers, body = read_response(connect(px.port, f"127.0.0.1:{dead}"))
        assert (status, body, headers.get("connection")) == (503, b"upstream connect error\n", "close")
        assert " 503 UF " in log_line_for(px, " 503 UF ")
    with ProxyThread([], routes=(CONNECT_ROUTE,)) as px:
        status, _, body = read_response(connect(px.port, f"127.0.0.1:{px.port}"))
        assert (status, body) == (403, b"CONNECT to the proxy's own port is not allowed\n")


@pytest.fixture
def loopback_only_service():
    """A service only the node itself can reach (127.0.0.1): what the open CONNECT proxy handed to pods."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(0.2)
        accepted: list[socket.socket] = []

        def reached() -> bool:
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                return bool(accepted)
            accepted.append(conn)
            return True

        yield srv.getsockname()[1], reached
        for conn in accepted:
            conn.close()


def test_connect_cannot_reach_loopback_localhost_or_outside_the_cluster(loopback_only_service, echo_port) -> None:
    """Issue 11 finding 5. Through an original-destination route the tunnel's target is the connection's
    original destination (here the proxy itself: the client was not intercepted), never the authority;
    through a cluster route an IP authority must be an endpoint of the cluster. Refused with 403."""
    port, reached = loopback_only_service
    with ProxyThread([], routes=(CONNECT_ROUTE,)) as px:
        for authority in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::ffff:127.0.0.1]:{port}"):
            status, headers, _ = read_response(connect(px.port, authority))
            assert (status, headers.get("connection")) == (403, "close"), authority
    route, clusters = connect_to_cluster("echo", ("127.0.0.1", echo_port))
    with ProxyThread([], routes=(route,), clusters=clusters) as px:
        for authority in (f"127.0.0.1:{port}", "198.18.2.10:5432", f"127.0.0.2:{echo_port}"):
            status, _, body = read_response(connect(px.port, authority))
            assert (status, body) == (403, b"CONNECT target is not an endpoint of the route's cluster\n"), authority
        # The legitimate CONNECT, by the cluster's own endpoint or by a name, still tunnels.
        for authority in (f"127.0.0.1:{echo_port}", "echo.internal:7"):
            s = connect(px.port, authority)
            assert read_response(s)[0] == 200
            s.sendall(b"ping")
            s.shutdown(socket.SHUT_WR)
            assert read_all(s) == b"ping"
            s.close()
    assert not reached(), "a CONNECT reached the loopback-only service"


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (b"CONNECT /not-an-authority HTTP/1.1\r\nHost: a\r\n\r\n", b"CONNECT needs an authority-form target"),
        (b"CONNECT 127.0.0.1:99999 HTTP/1.1\r\nHost: a\r\n\r\n", b"CONNECT needs an authority-form target"),
        (b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc", b"cannot carry a request body"),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nhi",
            b"an upgrade request cannot carry a request body",
        ),
        (b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", b"protocol upgrades need HTTP/1.1"),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n",
            b"chunked body on an h2c upgrade request",
        ),
    ],
)
def test_malformed_tunnel_requests_get_400(request_bytes: bytes, reason: bytes, echo_port: int) -> None:
    with ProxyThread([("127.0.0.1", echo_port)], routes=(CONNECT_ROUTE,)) as px:
        with socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
            s.sendall(request_bytes)
            status, headers, body = read_response(s)
            assert status == 400 and reason in body and headers["connection"] == "close", body
        assert " 400 DPE " in log_line_for(px, " 400 DPE ")
