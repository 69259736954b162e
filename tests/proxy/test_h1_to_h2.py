"""HTTP/1.x clients through the proxy to a cluster with http2=True: requests go upstream as streams on the pooled
h2c connections (h1_over_h2.py), responses come back as HTTP/1.1 (or 1.0). The backend is a real h2 server (the
h2 library on asyncio) that counts its connections, echoes bodies and trailers, resets or stalls on demand."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from planemesh.model.config import CircuitBreakers, Cluster, ClusterKind, Endpoint, RetryPolicy, Route, RouteAction
from tests.proxy import test_tls_termination as tls_tests
from tests.proxy.proxy_harness import ProxyThread, log_line_for
from tests.proxy.test_h2_nginx import Nginx, _since
from tests.proxy.test_h2_nginx import nginx as nginx  # the fixture
from tests.proxy.test_h2_pool import H2Client
from tests.proxy.test_tls_termination import certs as certs  # the fixture (TLS termination's certificates)

BIG = hashlib.sha256(b"x").digest() * (3 * 1024 * 1024 // 32)  # 3 MiB: above every flow-control window


class H2Backend:
    """h2c prior-knowledge server. Paths: /echo (the body back, with content-length; request facts as headers),
    /stream/<n> (n bytes, no content-length, trailers with their sha256), /reset (RST_STREAM before the head),
    /slow (answers after 3 s), /pause (after 0.5 s). `max_streams`: its SETTINGS_MAX_CONCURRENT_STREAMS."""

    def __init__(self, max_streams: int | None = None) -> None:
        self.max_streams = max_streams
        self.connections = 0
        self.closed = 0  # connections the proxy closed (or that broke)
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, sock=self.sock))
        self.loop.run_forever()
        self.loop.close()

    def __enter__(self) -> H2Backend:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Its connections end here, not in the garbage collector: a coroutine finalized there runs Python code,
        # and on Python 3.11.2 a collection inside pytest's assertion rewriting then fails the parse
        # ("SystemError: AST constructor recursion depth mismatch").
        asyncio.run_coroutine_threadsafe(self._shut(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _shut(self) -> None:
        self.server.close()
        tasks = asyncio.all_tasks() - {asyncio.current_task()}  # every connection's and response's
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        if self.max_streams is not None:
            conn.local_settings = h2.settings.Settings(
                client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, dict] = {}
        tasks: set[asyncio.Task] = set()
        window_open = asyncio.Event()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        streams[ev.stream_id] = {"headers": dict(ev.headers), "body": [], "trailers": []}
                    elif isinstance(ev, h2.events.DataReceived):
                        streams[ev.stream_id]["body"].append(ev.data)
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        streams[ev.stream_id]["trailers"] = ev.headers
                    elif isinstance(ev, h2.events.StreamEnded):
                        self.requests += 1
                        req = streams.pop(ev.stream_id)
                        task = asyncio.ensure_future(self._respond(conn, writer, ev.stream_id, req, window_open))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    elif isinstance(ev, h2.events.WindowUpdated):
                        window_open.set()
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            return
        finally:
            self.closed += 1
            writer.close()

    async def _respond(self, conn, writer, sid: int, req: dict, window_open: asyncio.Event) -> None:
        try:
            await self._answer(conn, writer, sid, req, window_open)
        except h2.exceptions.H2Error:
            pass  # the proxy reset the stream meanwhile (its timeout)

    async def _answer(self, conn, writer, sid: int, req: dict, window_open: asyncio.Event) -> None:
        path = req["headers"][b":path"]
        body = b"".join(req["body"])
        if path == b"/reset":
            conn.reset_stream(sid)
            writer.write(conn.data_to_send())
            return
        if path == b"/slow":
            await asyncio.sleep(3)
        if path == b"/pause":
            await asyncio.sleep(0.5)
        if path.startswith(b"/stream/"):
            payload = BIG[: int(path[8:])]
            conn.send_headers(sid, [(b":status", b"200"), (b"x-kind", b"stream")])
            await self._send(conn, writer, sid, payload, window_open)
            conn.send_headers(sid, [(b"x-sha", hashlib.sha256(payload).hexdigest().encode())], end_stream=True)
            writer.write(conn.data_to_send())
            return
        h = req["headers"]
        facts = [
            (b"x-authority", h.get(b":authority", b"")),
            (b"x-method", h[b":method"]),
            (b"x-te", h.get(b"te", b"-")),
            (b"x-hop", b"yes" if any(n in h for n in (b"connection", b"transfer-encoding", b"host")) else b"no"),
            (b"x-req-trailers", b";".join(n + b"=" + v for n, v in req["trailers"]) or b"-"),
            (b"x-rid", h.get(b"x-request-id", b"")),
            (b"x-scheme", h.get(b":scheme", b"")),
        ]
        conn.send_headers(sid, [(b":status", b"200"), (b"content-length", str(len(body)).encode()), *facts])
        await self._send(conn, writer, sid, body, window_open, end=True)

    async def _send(self, conn, writer, sid: int, data: bytes, window_open: asyncio.Event, end: bool = False) -> None:
        while True:
            n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(data))
            if n or not data:
                conn.send_data(sid, data[:n], end_stream=end and n == len(data))
                writer.write(conn.data_to_send())
                data = data[n:]
                if not data:
                    return
            else:
                window_open.clear()
                await window_open.wait()


@pytest.fixture(scope="module")
def backend() -> Iterator[H2Backend]:
    with H2Backend() as b:
        yield b


def _proxy(port: int, retry: RetryPolicy | None = None, timeout_s: float | None = None,
           breakers: CircuitBreakers | None = None) -> ProxyThread:
    cluster = Cluster(name="h2", kind=ClusterKind.STATIC, http2=True, endpoints=(Endpoint("127.0.0.1", port),),
                      circuit_breakers=breakers or CircuitBreakers())
    route = Route(action=RouteAction(cluster="h2", retry=retry, timeout_s=timeout_s))
    return ProxyThread([("127.0.0.1", port)], routes=(route,), clusters={"h2": cluster})


def _raw(port: int, request: bytes, until_close: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while True:
            part = s.recv(65536)
            if not part:
                return data
            data += part
            if not until_close and data.endswith(b"\r\n\r\n") and b"0\r\n" in data:
                return data


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    """A chunked body -> (the bytes, the trailer section)."""
    out = []
    while True:
        size, _, data = data.partition(b"\r\n")
        n = int(size, 16)
        if not n:
            return b"".join(out), data.removesuffix(b"\r\n\r\n")
        out.append(data[:n])
        data = data[n + 2 :]


def test_bodies_both_ways_over_one_h2_connection(backend: H2Backend) -> None:
    """Content-length and chunked request bodies (several MiB, byte-exact), a response without content-length
    arrives chunked with its trailers, and every keep-alive request shares one upstream h2c connection."""
    before = backend.connections
    with _proxy(backend.port) as proxy:
        client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        client.request("GET", "/echo", headers={"Host": "svc.example:8080", "TE": "trailers"})
        r = client.getresponse()
        assert (r.status, r.read()) == (200, b"")
        assert r.getheader("x-authority") == "svc.example:8080" and r.getheader("x-te") == "trailers"
        assert r.getheader("x-hop") == "no" and r.getheader("x-method") == "GET" and r.getheader("x-rid")
        client.request("POST", "/echo", body=BIG)
        r = client.getresponse()
        assert r.getheader("content-length") == str(len(BIG)) and r.read() == BIG
        client.request("POST", "/echo", body=iter([BIG[:1000], BIG[1000:]]), encode_chunked=True)
        r = client.getresponse()
        assert r.read() == BIG
        client.request("GET", f"/stream/{len(BIG) - 7}")
        r = client.getresponse()
        assert r.getheader("transfer-encoding") == "chunked" and r.getheader("content-length") is None
        assert r.read() == BIG[: len(BIG) - 7]
        for i in range(50):
            client.request("POST", "/echo", body=b"n%d" % i)
            assert client.getresponse().read() == b"n%d" % i
        client.close()
        line = log_line_for(proxy, "/stream/")
        assert " 200 " in line and f"127.0.0.1:{backend.port}" in line, line
    assert backend.connections == before + 1


def test_drain_closes_the_pooled_h2c_upstream_connections() -> None:
    """PlaneProxy.drain() closes the h2c upstream connections it pooled, for an HTTP/1.1 and an h2 client (old
    code: they lived in a module-level map that drain never saw, and stayed open after drain, until the event
    loop itself was closed)."""
    with H2Backend() as b:
        proxy = _proxy(b.port)
        proxy.after_drain_s = 3.0  # the proxy's loop goes on running after drain: nothing else closes them
        with proxy:
            client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            client.request("GET", "/echo")
            assert client.getresponse().read() == b""
            client.close()
            with H2Client(proxy.port) as h2c:
                assert h2c.get("/echo")["status"] == 200
            assert b.connections == 1 and b.closed == 0  # pooled: one connection for both, still open
            asyncio.run_coroutine_threadsafe(proxy.proxy.drain(0.2), proxy.loop).result(timeout=5)
            deadline = time.monotonic() + 2
            while b.closed < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert b.closed == 1


def test_an_idle_h2c_upstream_connection_is_closed_after_the_idle_timeout() -> None:
    """A pooled h2c connection without streams is closed once idle for the pool's idle timeout, as HTTP/1.1
    upstream connections are (old code: it stayed open until drain or the server's GOAWAY)."""
    with H2Backend() as b, _proxy(b.port) as proxy:
        proxy.proxy.pool.idle_timeout_s = 0.3
        with H2Client(proxy.port) as h2c:
            assert h2c.get("/echo")["status"] == 200
            assert b.connections == 1
            deadline = time.monotonic() + 5
            while b.closed < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert b.closed == 1  # closed by the sweep while the client's connection stays open
            assert h2c.get("/echo")["status"] == 200  # the next request opens a new one
        assert b.connections == 2


def test_trailers_both_ways(backend: H2Backend) -> None:
    with _proxy(backend.port) as proxy:
        req = (
            b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nte: trailers\r\n\r\n"
            b"5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n"
        )
        resp = _raw(proxy.port, req + b"GET /stream/10 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", True)
        first, _, second = resp.partition(b"hello")
        assert b"x-req-trailers: x-checksum=abc" in first and b"content-length: 5" in first
        head, _, body = second.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head
        sha = hashlib.sha256(BIG[:10]).hexdigest().encode()
        assert body == b"a\r\n" + BIG[:10] + b"\r\n0\r\nx-sha: " + sha + b"\r\n\r\n"


def test_http10_client_gets_a_close_delimited_body(backend: H2Backend) -> None:
    with _proxy(backend.port) as proxy:
        resp = _raw(proxy.port, b"GET /stream/100000 HTTP/1.0\r\n\r\n", until_close=True)
        head, _, body = resp.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head and b"content-length" not in head
        assert body == BIG[:100000]
        resp = _raw(proxy.port, b"POST /echo HTTP/1.0\r\ncontent-length: 3\r\n\r\nabc", until_close=True)
        assert resp.endswith(b"\r\n\r\nabc") and b"content-length: 3" in resp


def test_upstream_reset_is_502_and_retried(backend: H2Backend) -> None:
    with _proxy(backend.port) as proxy:
        client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        client.request("GET", "/reset")
        r = client.getresponse()
        assert r.status == 502 and r.read()
        client.request("GET", "/echo")  # the client's connection stays usable
        assert client.getresponse().status == 200
        assert " UC " in log_line_for(proxy, "/reset")
    before = backend.requests
    with _proxy(backend.port, RetryPolicy(retry_on=frozenset({"reset"}), num_retries=2)) as proxy:
        client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        client.request("GET", "/reset")
        r = client.getresponse()
        assert r.status == 502 and r.read()
        assert "URX" in log_line_for(proxy, "/reset")
    assert backend.requests - before == 3


def test_slow_upstream_is_504(backend: H2Backend) -> None:
    with _proxy(backend.port, timeout_s=0.3) as proxy:
        client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        t0 = time.monotonic()
        client.request("GET", "/slow")
        r = client.getresponse()
        assert r.status == 504 and r.read() and time.monotonic() - t0 < 2
        client.request("GET", "/echo")
        assert client.getresponse().status == 200
        assert " UT " in log_line_for(proxy, "/slow")


def test_concurrent_clients_and_a_slow_reader(backend: H2Backend) -> None:
    """Eight HTTP/1.1 clients at once share the h2c connection; a client that reads a 3 MiB response only after
    a second still gets it byte-exact, with its trailers."""
    before = backend.connections
    with _proxy(backend.port) as proxy:
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
                for j in range(20):
                    body = b"%d-%d" % (i, j) * 1000
                    client.request("POST", "/echo", body=body)
                    assert client.getresponse().read() == body
                client.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as slow:
            slow.sendall(b"GET /stream/%d HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n" % len(BIG))
            time.sleep(1.0)
            data = b""
            while part := slow.recv(65536):
                data += part
        for t in threads:
            t.join(20)
        assert not errors, errors
        body, trailers = _dechunk(data.partition(b"\r\n\r\n")[2])
        assert body == BIG and trailers == b"x-sha: " + hashlib.sha256(BIG).hexdigest().encode()
        assert proxy.proxy.stats.requests_active == 0
    assert backend.connections == before + 1


def test_h1_clients_to_nginx_h2c(nginx: Nginx) -> None:
    """h2load --h1 (4 keep-alive HTTP/1.1 clients) to nginx's h2c: multiplexed on few connections; and on the
    port where nginx sends GOAWAY every 100 streams, the refused ones are opened again (no 5xx)."""
    for port, most in ((nginx.h2c_port, 2), (nginx.h2c_short_port, 100)):
        before = len(nginx.log_lines())
        with _proxy(port) as proxy:
            out = subprocess.run(
                ["h2load", "--h1", "-n", "2000", "-c", "4", f"http://127.0.0.1:{proxy.port}/"],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            assert "status codes: 2000 2xx" in out, out
            assert proxy.proxy.stats.requests_active == 0
        seen = _since(nginx, before, port)
        assert len(seen) == 2000
        assert len({conn for conn, *_ in seen}) <= most


def _concurrent_gets(port: int, path: str, n: int) -> list[tuple[int, str | None]]:
    """n HTTP/1.1 clients at once: (status, x-planemesh-overloaded) of each."""
    results: list[tuple[int, str | None]] = []

    def one() -> None:
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        client.request("GET", path)
        r = client.getresponse()
        r.read()
        results.append((r.status, r.getheader("x-planemesh-overloaded")))
        client.close()

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_max_connections_counts_h2_connections_not_streams(backend: H2Backend) -> None:
    """Envoy's max_connections counts upstream connections: concurrent requests to an http2 cluster are streams
    of one connection, which holds the cluster's one unit (before, every stream took a unit: the second
    concurrent request got 503 cluster_connections)."""
    with _proxy(backend.port, breakers=CircuitBreakers(max_connections=1)) as proxy:
        assert _concurrent_gets(proxy.port, "/pause", 4) == [(200, None)] * 4
        assert _concurrent_gets(proxy.port, "/pause", 4) == [(200, None)] * 4  # the unit is the connection's


def test_max_pending_counts_streams_waiting_for_their_connection(backend: H2Backend) -> None:
    """max_pending_requests counts streams waiting for their h2 connection to be made: with none allowed no
    stream may wait (503 cluster_pending), and once the connection exists streams on it never wait."""
    with _proxy(backend.port, breakers=CircuitBreakers(max_pending_requests=0)) as proxy:
        assert _concurrent_gets(proxy.port, "/echo", 1) == [(503, "cluster_pending")]
    with _proxy(backend.port, breakers=CircuitBreakers(max_pending_requests=1)) as proxy:
        assert _concurrent_gets(proxy.port, "/echo", 1) == [(200, None)]
        assert _concurrent_gets(proxy.port, "/pause", 3) == [(200, None)] * 3  # on the made connection


def _still_waiting(proxy: ProxyThread) -> list:
    """The attempts the proxy's h2 pool still has waiting for a stream (h2_upstream.H2Pool.waiting)."""
    return [entry[0] for queue in proxy.proxy.h2_pool.pool.waiting.values() for entry in queue if entry[0].waiting]


def test_streams_over_max_connections_wait_for_a_free_stream() -> None:
    """Envoy's pool: with the cluster's one connection unit taken and every stream of that connection in use (the
    server allows 2), further requests wait as pending requests and go on the connection as its streams end,
    oldest first; none is refused, and no second connection is opened. With one pending request allowed, one
    waits and the others are answered 503 cluster_pending at once."""
    with H2Backend(max_streams=2) as backend:
        with _proxy(backend.port, breakers=CircuitBreakers(max_connections=1)) as proxy:
            assert _concurrent_gets(proxy.port, "/echo", 1) == [(200, None)]  # the connection, its SETTINGS in
            assert _concurrent_gets(proxy.port, "/pause", 6) == [(200, None)] * 6
        assert backend.connections == 1
        limits = CircuitBreakers(max_connections=1, max_pending_requests=1)
        with _proxy(backend.port, breakers=limits) as proxy:
            assert _concurrent_gets(proxy.port, "/echo", 1) == [(200, None)]
            started = time.monotonic()
            results = sorted(_concurrent_gets(proxy.port, "/slow", 5), key=lambda r: r[0])
            assert results == [(200, None)] * 3 + [(503, "cluster_pending")] * 2
            assert time.monotonic() - started >= 5.5  # the waiting one went on when a first /slow had ended
            breaker = proxy.proxy.table.balancer.breaker(proxy.snapshot.clusters["h2"])
            assert breaker.counts["pending"] == 0 and breaker.counts["connections"] == 1  # the connection's
            assert not breaker.waiters and not _still_waiting(proxy)
        assert breaker.counts["connections"] == 0  # given back with the connection (the proxy drained)


def test_a_waiting_stream_times_out_and_leaves_the_queue(backend: H2Backend) -> None:
    """A request waiting for a connection unit of an http2 cluster gets the route's timeout (504 UT), leaves both
    queues (the breaker's and the pool's) and holds no unit; once a unit is free requests go through again."""
    with _proxy(backend.port, timeout_s=0.3, breakers=CircuitBreakers(max_connections=1)) as proxy:
        breaker = proxy.proxy.table.balancer.breaker(proxy.snapshot.clusters["h2"])
        proxy.call(breaker.try_acquire, "connections")  # every connection unit taken, none of them ours
        requests_before = backend.requests
        assert _concurrent_gets(proxy.port, "/echo", 1) == [(504, None)]
        assert '" 504 UT ' in log_line_for(proxy, "/echo")
        assert not breaker.waiters and breaker.counts["pending"] == 0
        assert not _still_waiting(proxy)
        proxy.call(breaker.release, "connections")
        assert _concurrent_gets(proxy.port, "/echo", 1) == [(200, None)]
        assert backend.requests == requests_before + 1  # the one that waited was never sent


def test_scheme_upstream_is_the_clients(backend: H2Backend, monkeypatch: pytest.MonkeyPatch, certs: Path) -> None:
    """An HTTP/1.1 request goes to an h2 upstream with :scheme http, or https when the proxy terminated the
    client's TLS (Envoy's behaviour; before, always http)."""
    with _proxy(backend.port) as proxy:
        client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        client.request("GET", "/echo")
        r = client.getresponse()
        assert (r.status, r.getheader("x-scheme"), r.read()) == (200, "http", b"")
        client.close()
    h2_cluster = Cluster(name="backend", kind=ClusterKind.STATIC, http2=True,
                         endpoints=(Endpoint("127.0.0.1", backend.port),))
    snapshot = tls_tests.make_snapshot
    monkeypatch.setattr(tls_tests, "make_snapshot",
                        lambda *a, **k: snapshot(*a, clusters={"backend": h2_cluster}, **k))
    with tls_tests.TlsProxy(backend.port) as proxy:
        reply = tls_tests.get(proxy.port, tls_tests.client_ctx(certs), "/echo")
    assert reply.startswith(b"HTTP/1.1 200") and b"\r\nx-scheme: https\r\n" in reply.lower(), reply
