"""h2 streams to an HTTP/1.1 cluster share pooled upstream connections (the HTTP/1 path's UpstreamPool).

The backend records the peer port of every request, so reuse is seen where it happens. A connection that says
`connection: close`, one that broke mid-body and one whose stream the client cancelled are never reused; a
pooled connection the server closed before answering is retried once on a fresh one.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from tests.proxy.proxy_harness import BackendHandler, ProxyThread, ThreadedBackend


class H2Client:
    """A blocking h2c (prior knowledge) client: enough to send streams, read answers and reset streams."""

    def __init__(self, port: int, host: str = "127.0.0.1", window: int = 0) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        if window:  # a client that allows (much) more than it reads
            self.conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        self.conn.initiate_connection()
        if window:
            self.conn.increment_flow_control_window(window - 65535)
        self.sock.sendall(self.conn.data_to_send())
        self.authority = f"{host}:{port}".encode()
        self.responses: dict[int, dict] = {}

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def start(self, path: str, method: str = "GET", body: bytes = b"", *, end: bool = True) -> int:
        """Open a stream; with end=False the body follows through upload()."""
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":path", path.encode()),
            (b":scheme", b"http"),
            (b":authority", self.authority),
        ]
        if body:
            headers.append((b"content-length", str(len(body)).encode()))
        self.conn.send_headers(sid, headers, end_stream=end and not body)
        if body:
            self.conn.send_data(sid, body, end_stream=end)  # small bodies only: within the first window
        self.responses[sid] = {"status": 0, "body": bytearray(), "done": False, "reset": None}
        self.sock.sendall(self.conn.data_to_send())
        return sid

    def upload(self, sid: int, size: int, seconds: float, end: bool = False) -> int:
        """Send up to `size` body bytes as fast as the proxy's windows allow, for at most `seconds`."""
        sent = 0
        deadline = time.monotonic() + seconds
        self.sock.settimeout(0.05)
        try:
            while sent < size and time.monotonic() < deadline:
                n = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size, size - sent)
                if n > 0:
                    sent += n
                    self.conn.send_data(sid, b"z" * n, end_stream=end and sent == size)
                    self.sock.sendall(self.conn.data_to_send())
                    continue
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    continue
                self.conn.receive_data(data)  # WINDOW_UPDATEs
                self.sock.sendall(self.conn.data_to_send())
        finally:
            self.sock.settimeout(10)
        return sent

    def reset(self, sid: int) -> None:
        self.conn.reset_stream(sid)
        self.sock.sendall(self.conn.data_to_send())

    def pump(self, until) -> None:
        """Read and handle frames until until() holds."""
        while not until():
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("proxy closed the connection")
            for event in self.conn.receive_data(data):
                sid = getattr(event, "stream_id", 0)
                r = self.responses.get(sid)
                if r is None:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    r["status"] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    r["body"] += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.StreamEnded):
                    r["done"] = True
                elif isinstance(event, h2.events.StreamReset):
                    r["reset"] = event.error_code
                    r["done"] = True
            self.sock.sendall(self.conn.data_to_send())

    def get(self, path: str, method: str = "GET", body: bytes = b"") -> dict:
        sid = self.start(path, method, body)
        self.pump(lambda: self.responses[sid]["done"])
        return self.responses[sid]


class PortHandler(BackendHandler):
    """Records (path, peer port) per request; a few paths misbehave on purpose."""

    server: PortBackend

    def do_POST(self) -> None:
        if not self.path.startswith("/slowread"):
            super().do_POST()
            return
        time.sleep(1.5)  # reads nothing for a while, then all of the (chunked) body
        self._read_body()
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_GET(self) -> None:
        self.server.ports.append((self.path, self.client_address[1]))
        if self.path.startswith("/close"):  # answers, then closes the connection as it says
            self.send_response(200)
            self.send_header("connection", "close")
            self.send_header("content-length", "3")
            self.end_headers()
            self.wfile.write(b"bye")
            self.close_connection = True
        elif self.path.startswith("/broken"):  # promises 100000 bytes, sends 10, closes
            self.send_response(200)
            self.send_header("content-length", "100000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif self.path.startswith("/endless"):  # a body read slowly: the client cancels half way
            self.send_response(200)
            self.send_header("content-length", str(64 << 20))
            self.end_headers()
            try:
                for _ in range(1024):
                    self.wfile.write(b"x" * 65536)
            except OSError:
                pass
            self.close_connection = True
        elif self.path.startswith("/huge"):  # 256 MiB, counting what went out
            self.send_response(200)
            self.send_header("content-length", str(256 << 20))
            self.end_headers()
            block = b"y" * (1 << 20)
            try:
                for _ in range(256):
                    self.wfile.write(block)
                    self.server.huge_sent += len(block)
            except OSError:
                pass
            self.close_connection = True
        elif self.path.startswith("/once"):  # keep-alive in words, yet only one request per connection
            self.send_response(200)
            self.send_header("content-length", "4")
            self.end_headers()
            self.wfile.write(b"once")
            self.wfile.flush()
            self.server.once_conns.append(self.connection)  # read the next request, then close: see below
            self.connection.settimeout(5)
            try:
                self.rfile.readline()  # the next request's line arrives on this connection
            except OSError:
                pass
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        else:
            super().do_GET()


class PortBackend(ThreadedBackend):
    request_queue_size = 1024  # many streams at once: one upstream connection each (listen's backlog)

    def __init__(self) -> None:
        super().__init__("127.0.0.1", PortHandler)
        self.ports: list[tuple[str, int]] = []
        self.once_conns: list[socket.socket] = []
        self.huge_sent = 0
        self.seen: list = []
        self.failed_once: set[str] = set()


@pytest.fixture
def setup() -> Iterator[tuple[PortBackend, ProxyThread]]:
    with PortBackend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as proxy:
        yield backend, proxy


def _idle(proxy: ProxyThread) -> int:
    return proxy.call(lambda: sum(len(v) for v in proxy.proxy.pool.idle.values()))


def _eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def test_sequential_streams_share_one_upstream_connection(setup: tuple[PortBackend, ProxyThread]) -> None:
    backend, proxy = setup
    with H2Client(proxy.port) as client:
        for i in range(20):
            r = client.get(f"/seq/{i}")
            assert (r["status"], r["body"]) == (200, f"hello /seq/{i}\n".encode())
    assert len(backend.ports) == 20
    assert len({port for _, port in backend.ports}) == 1
    assert proxy.proxy.stats.upstream_total == 1


def test_concurrent_streams_use_fewer_connections_than_streams(setup: tuple[PortBackend, ProxyThread]) -> None:
    backend, proxy = setup
    with H2Client(proxy.port) as client:
        for _ in range(10):  # 10 rounds of 8 concurrent streams: 8 connections at most, reused every round
            sids = [client.start(f"/c/{i}") for i in range(8)]
            client.pump(lambda: all(client.responses[s]["done"] for s in sids))  # noqa: B023
            assert {client.responses[s]["status"] for s in sids} == {200}
            assert [client.responses[s]["body"] for s in sids] == [f"hello /c/{i}\n".encode() for i in range(8)]
    ports = {port for _, port in backend.ports}
    assert len(backend.ports) == 80
    assert len(ports) <= 8
    assert proxy.proxy.stats.upstream_total == len(ports)
    _eventually(lambda: _idle(proxy) == len(ports))


def test_connection_close_is_not_reused(setup: tuple[PortBackend, ProxyThread]) -> None:
    backend, proxy = setup
    with H2Client(proxy.port) as client:
        for _ in range(5):
            r = client.get("/close")
            assert (r["status"], r["body"]) == (200, b"bye")
        assert client.get("/after")["status"] == 200
    ports = [port for _, port in backend.ports]
    assert len(set(ports)) == 6  # each /close on its own connection, /after on yet another
    assert _idle(proxy) == 1


def test_upstream_error_mid_body_does_not_poison_the_pool(setup: tuple[PortBackend, ProxyThread]) -> None:
    backend, proxy = setup
    with H2Client(proxy.port) as client:
        assert client.get("/first")["status"] == 200
        broken = client.get("/broken")
        assert broken["status"] == 200 and broken["reset"] is not None  # the stream is reset, not ended
        assert len(broken["body"]) < 100000
        for i in range(3):
            r = client.get(f"/next/{i}")
            assert (r["status"], r["body"]) == (200, f"hello /next/{i}\n".encode())
    by_path = dict(backend.ports)
    assert by_path["/broken"] == by_path["/first"]  # reused once, for /broken ...
    assert by_path["/next/0"] != by_path["/broken"]  # ... and never after it broke
    assert by_path["/next/0"] == by_path["/next/1"] == by_path["/next/2"]
    assert any('"GET /broken HTTP/2" 200 UC' in line for line in proxy.flush_log())


def test_cancelled_stream_mid_body_closes_its_connection(setup: tuple[PortBackend, ProxyThread]) -> None:
    backend, proxy = setup
    with H2Client(proxy.port) as client:
        sid = client.start("/endless")
        client.pump(lambda: len(client.responses[sid]["body"]) > 100_000)
        client.reset(sid)
        r = client.get("/after")
        assert (r["status"], r["body"]) == (200, b"hello /after\n")
    by_path = dict(backend.ports)
    assert by_path["/after"] != by_path["/endless"]
    _eventually(lambda: proxy.proxy.stats.upstream_active == 1 and _idle(proxy) == 1)
    assert proxy.proxy.stats.requests_active == 0


def test_pooled_connection_closed_by_the_server_is_retried_on_a_fresh_one(
    setup: tuple[PortBackend, ProxyThread],
) -> None:
    backend, proxy = setup
    with H2Client(proxy.port) as client:
        assert client.get("/once/1")["body"] == b"once"
        r = client.get("/once/2")  # goes to the pooled connection, which the server closes unanswered
        assert (r["status"], r["body"]) == (200, b"once")
    assert [path for path, _ in backend.ports] == ["/once/1", "/once/2"]
    assert backend.ports[0][1] != backend.ports[1][1]
    assert proxy.proxy.stats.upstream_total == 2


def test_request_bodies_on_pooled_connections(setup: tuple[PortBackend, ProxyThread]) -> None:
    _, proxy = setup
    with H2Client(proxy.port) as client:
        for i in range(5):
            body = bytes([65 + i]) * 5000
            r = client.get(f"/echo/{i}", method="POST", body=body)
            assert (r["status"], r["body"]) == (200, body)
    assert proxy.proxy.stats.upstream_total == 1


def test_many_streams_many_clients_no_mixup() -> None:
    """Streams of several h2 connections interleave over the pool: every answer is its own request's."""
    with PortBackend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as proxy:
        errors: list[str] = []

        def client_run(n: int) -> None:
            try:
                with H2Client(proxy.port) as client:
                    for rnd in range(5):
                        sids = {client.start(f"/m/{n}/{rnd}/{i}"): i for i in range(20)}
                        client.pump(lambda: all(client.responses[s]["done"] for s in sids))  # noqa: B023
                        for sid, i in sids.items():
                            if client.responses[sid]["body"] != f"hello /m/{n}/{rnd}/{i}\n".encode():
                                errors.append(f"{n}/{rnd}/{i}: {client.responses[sid]}")
            except Exception as exc:  # reported below with the rest
                errors.append(repr(exc))

        threads = [threading.Thread(target=client_run, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors[:5]
        assert len(backend.ports) == 400
        assert proxy.proxy.stats.upstream_total < 400
        assert proxy.proxy.stats.requests_active == 0


def test_slow_reader_with_a_huge_window_holds_the_upstream_back(setup: tuple[PortBackend, ProxyThread]) -> None:
    """h2 flow control alone would let 2 GiB through to a client that allows it; the proxy's transport buffer
    stops at its high-water mark instead, and so does the upstream (kernel socket buffers on the way hold a
    few MiB each)."""
    backend, proxy = setup
    with H2Client(proxy.port, window=(1 << 31) - 1) as client:
        sid = client.start("/huge")
        client.pump(lambda: client.responses[sid]["status"] == 200)
        time.sleep(1.5)  # not reading
        held = backend.huge_sent
        assert held < 96 << 20, held
        client.pump(lambda: len(client.responses[sid]["body"]) >= 128 << 20)  # reading again: it flows
        client.reset(sid)
    assert backend.huge_sent >= 128 << 20


def test_slow_upstream_reader_holds_the_client_back(setup: tuple[PortBackend, ProxyThread]) -> None:
    """A request body goes as fast as the upstream takes it: the client's credit (WINDOW_UPDATE) comes only
    once the bytes went into the upstream connection below its high-water mark."""
    _, proxy = setup
    total = 64 << 20
    with H2Client(proxy.port) as client:
        sid = client.start("/slowread", method="POST", end=False)
        sent = client.upload(sid, total, seconds=1.0)  # the backend reads nothing for 1.5 s
        assert sent < 24 << 20, sent
        sent += client.upload(sid, total - sent, seconds=20, end=True)
        assert sent == total
        client.pump(lambda: client.responses[sid]["done"])
        assert (client.responses[sid]["status"], client.responses[sid]["body"]) == (200, b"ok")
