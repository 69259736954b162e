"""HTTP/2 abuse against the real proxy on loopback (issue 11, findings 2, 3 and 9): rapid reset, control-frame
floods and a zero-window client with many streams. Attackers write raw frames; each abusive connection gets
GOAWAY(ENHANCE_YOUR_CALM) and is closed, the worker's memory stays bounded, and a well-behaved h2 client on the
same proxy keeps getting 200s throughout."""

from __future__ import annotations

import contextlib
import re
import select
import socket
import struct
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

from planemesh.model.config import Route
from planemesh.model.planes import SLA
from tests.proxy.proxy_harness import Backend, BackendHandler, ProxyThread, ThreadedBackend
from tests.support.procs import dev_module_argv

pytestmark = pytest.mark.unit

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM, PROTOCOL_ERROR, REFUSED_STREAM, CANCEL = 0xB, 0x1, 0x7, 0x8
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 2, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4
# HPACK, stateless: :method GET, :scheme http, :path /, :authority "x" (literal, not indexed).
GET_BLOCK = b"\x82\x86\x84\x01\x01x"
POST_BLOCK = b"\x83\x86\x84\x01\x01x"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


class CountingBackend(Backend):
    """Backend that counts the connections it accepted (the proxy's upstream connections)."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted = 0

    def verify_request(self, request, client_address) -> bool:  # type: ignore[no-untyped-def]
        self.accepted += 1
        return True


class Attacker:
    """A raw h2 connection: the preface, our SETTINGS, then whatever the test writes; it notes the server's
    GOAWAY and the close."""

    def __init__(self, port: int, settings: bytes = b"") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))
        self.buf = b""
        self.goaway: int | None = None
        self.closed = False
        self.frames_sent = 0
        self.frames: list[tuple[int, int, int, bytes]] = []  # what the server sent (but GOAWAY), when kept
        self.keep_frames = True

    def poll(self, timeout: float = 0.0) -> None:
        """Read what is there (no more than `timeout` waiting) and parse frames."""
        while not self.closed and select.select([self.sock], [], [], timeout)[0]:
            try:
                data = self.sock.recv(1 << 20)
            except (ConnectionResetError, TimeoutError):
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            self.buf += data
            while len(self.buf) >= 9:
                length = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + length:
                    break
                kind, flags = self.buf[3], self.buf[4]
                if kind == GOAWAY:
                    self.goaway = int.from_bytes(self.buf[13:17], "big")
                elif self.keep_frames:
                    sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
                    self.frames.append((kind, flags, sid, self.buf[9 : 9 + length]))
                self.buf = self.buf[9 + length :]
            timeout = 0.0

    def send(self, data: bytes, frames: int) -> bool:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            return False
        self.frames_sent += frames
        return True

    def wait_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self.poll(0.05)

    def close(self) -> None:
        self.sock.close()


class GoodClient(threading.Thread):
    """A well-behaved h2 client: one connection, one GET after another until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.statuses: list[int] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.path = "/good"

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def _run(self) -> None:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(client.data_to_send())
            while not self.stop.is_set():
                sid = client.get_next_available_stream_id()
                client.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "good"),
                                          (":path", self.path)], end_stream=True)  # fmt: skip
                sock.sendall(client.data_to_send())
                status = 0
                done = False
                while not done:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("the proxy closed the good client's connection")
                    for event in client.receive_data(data):
                        if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                            status = int(dict(event.headers)[b":status"])
                        elif isinstance(event, h2.events.DataReceived):
                            client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                            done = True
                    sock.sendall(client.data_to_send())
                self.statuses.append(status)
                time.sleep(0.01)

    def check(self) -> None:
        self.stop.set()
        self.join(timeout=15)
        assert self.error is None, f"the well-behaved client failed: {self.error!r}"
        assert self.statuses and set(self.statuses) == {200}, self.statuses[-20:]


def flood(port: int, unit: bytes, *, first: bytes = b"", read: bool = True, batch: int = 500,
          max_frames: int = 400_000, give_up_s: float = 8.0) -> tuple[Attacker, float]:
    """Send `unit` over and over on one connection until the proxy closes it (or max_frames / give_up_s)."""
    attacker = Attacker(port)
    attacker.keep_frames = False
    attacker.sock.settimeout(2)
    if first:
        attacker.send(first, 1)
    chunk = unit * batch
    t0 = time.monotonic()
    while attacker.frames_sent < max_frames and time.monotonic() - t0 < give_up_s:
        if not attacker.send(chunk, batch):
            break
        if read:
            attacker.poll()
            if attacker.closed:
                break
    elapsed = time.monotonic() - t0
    attacker.wait_closed(5)
    return attacker, elapsed


FLOODS = {
    "ping": frame(PING, 0, 0, b"12345678"),
    "settings": frame(SETTINGS, 0, 0),
    "window_update": frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)),
    "priority": frame(PRIORITY, 0, 1, struct.pack(">IB", 0, 15)),
    "empty_data": frame(DATA, 0, 1),
}


@pytest.mark.parametrize("kind", list(FLOODS))
def test_control_and_empty_frame_floods_are_closed(kind: str) -> None:
    with Backend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as px:
        good = GoodClient(px.port)
        good.start()
        first = frame(HEADERS, END_HEADERS, 1, POST_BLOCK) if kind == "empty_data" else b""
        attacker, elapsed = flood(px.port, FLOODS[kind], first=first)
        try:
            assert attacker.closed, f"{kind} flood: {attacker.frames_sent} frames in {elapsed:.1f}s, never closed"
            assert attacker.goaway == ENHANCE_YOUR_CALM
            # The guard trips within a second at this rate; bench/floods.py measures the time, this bound only
            # keeps a loaded CI machine from failing the test (the old code never closed).
            assert elapsed < 5, elapsed
        finally:
            attacker.close()
        time.sleep(0.3)  # the good client goes on after the attack
        good.check()
        assert px.proxy.stats.h2_abuse_closed == 1


def test_ping_flood_from_a_client_that_never_reads_is_closed() -> None:
    with Backend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as px:
        attacker, elapsed = flood(px.port, FLOODS["ping"], read=False)
        try:
            assert attacker.closed and attacker.goaway == ENHANCE_YOUR_CALM, (attacker.frames_sent, elapsed)
        finally:
            attacker.close()


def test_header_continuation_flood_is_closed() -> None:
    """Empty CONTINUATION frames without END_HEADERS: the h2 library's own backlog limit (64) ends the
    connection (this one held before the guard too)."""
    with Backend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as px:
        attacker, _ = flood(px.port, frame(CONTINUATION, 0, 1), first=frame(HEADERS, 0, 1))
        try:
            assert attacker.closed and attacker.goaway in (ENHANCE_YOUR_CALM, PROTOCOL_ERROR)
        finally:
            attacker.close()


def rapid_reset_batch(first_sid: int, n: int) -> bytes:
    rst = struct.pack(">I", CANCEL)
    return b"".join(
        frame(HEADERS, END_STREAM | END_HEADERS, sid, GET_BLOCK) + frame(RST_STREAM, 0, sid, rst)
        for sid in range(first_sid, first_sid + 2 * n, 2)
    )


def test_rapid_reset_is_closed_without_reaching_the_upstream() -> None:
    with CountingBackend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as px:
        good = GoodClient(px.port)
        good.start()
        time.sleep(0.2)
        before = backend.accepted
        attacker = Attacker(px.port)
        attacker.keep_frames = False
        attacker.sock.settimeout(2)
        sid, t0 = 1, time.monotonic()
        while sid < 2**31 - 400 and time.monotonic() - t0 < 8:
            if not attacker.send(rapid_reset_batch(sid, 100), 100):
                break
            sid += 200
            attacker.poll()
            if attacker.closed:
                break
        attacker.wait_closed(5)
        try:
            assert attacker.closed, f"{attacker.frames_sent} resets in {time.monotonic() - t0:.1f}s, never closed"
            assert attacker.goaway == ENHANCE_YOUR_CALM
            assert px.proxy.stats.h2_premature_resets < 2000  # Envoy's rule closes at 250 premature resets
        finally:
            attacker.close()
        # Opened and reset in the same read: never sent upstream (a pair split across two reads may be).
        assert backend.accepted - before <= 5
        good.check()
        assert px.proxy.stats.h2_premature_resets >= 250


def test_streams_beyond_max_concurrent_are_refused_not_the_connection() -> None:
    """Past SETTINGS_MAX_CONCURRENT_STREAMS (100) a stream gets RST_STREAM(REFUSED_STREAM); the streams in
    progress and the connection stay."""
    with SlowBackend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as px:
        client = Attacker(px.port)
        block = b"\x82\x86\x04\x09/hold/0.5\x01\x01x"  # GET /hold/0.5
        sids = list(range(1, 241, 2))
        client.send(b"".join(frame(HEADERS, END_STREAM | END_HEADERS, sid, block) for sid in sids), len(sids))
        refused, ended = set(), set()
        deadline = time.monotonic() + 20
        while len(refused) + len(ended) < len(sids) and time.monotonic() < deadline and not client.closed:
            client.poll(0.1)
            for kind, flags, sid, payload in client.frames:
                if kind == RST_STREAM:
                    assert int.from_bytes(payload, "big") == REFUSED_STREAM
                    refused.add(sid)
                elif kind == SETTINGS and not flags & 1:
                    values = dict(struct.unpack(">HI", payload[i : i + 6]) for i in range(0, len(payload), 6))
                    assert values[0x3] == 100  # SETTINGS_MAX_CONCURRENT_STREAMS
                elif kind in (HEADERS, DATA) and flags & END_STREAM:
                    ended.add(sid)
            client.frames.clear()
        client.close()
        assert not client.closed and client.goaway is None
        assert (len(ended), len(refused)) == (100, 20)
        assert refused == set(sids[100:])


# ---- memory budget (finding 9) ---------------------------------------------------------------------------

BLOCK = b"z" * 65536


class StreamingHandler(BackendHandler):
    """/stream/<blocks>: a chunked body of that many 64 KiB blocks, written from one constant block (the
    backend's own memory stays flat); /hold/<s>: answers after s seconds."""

    def do_GET(self) -> None:
        if self.path.startswith("/stream/"):
            blocks = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            try:
                for _ in range(blocks):
                    self.wfile.write(b"10000\r\n" + BLOCK + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
        elif self.path.startswith("/hold/"):
            time.sleep(float(self.path.split("/")[2]))
            self._send(200, b"held\n")
        else:
            super().do_GET()


class SlowBackend(ThreadedBackend):
    request_queue_size = 1024  # a hundred connections at once

    def __init__(self) -> None:
        super().__init__("127.0.0.1", StreamingHandler)
        self.seen: list = []
        self.failed_once: set[str] = set()


@contextlib.contextmanager
def backend_process() -> Iterator[int]:
    """A SlowBackend in a child process (its threads' memory is not the worker's): yields its port."""
    child = subprocess.Popen(dev_module_argv("tests.proxy.test_h2_abuse"), stdout=subprocess.PIPE, text=True)
    try:
        yield int(child.stdout.readline())  # type: ignore[union-attr]
    finally:
        child.kill()
        child.wait(timeout=10)


def serve_forever() -> None:
    with SlowBackend() as backend:
        print(backend.port, flush=True)
        threading.Event().wait()


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


@pytest.mark.parametrize("max_streams", [100, 1000])
def test_zero_window_client_with_1000_streams_keeps_memory_bounded(max_streams: int) -> None:
    """A client that advertises a zero stream window and opens 1,000 streams of large responses: the proxy
    reads at most its buffer budget from the upstreams and waits (before: about 1 MiB per stream, 1.1 GB).
    With 1,000 concurrent streams allowed, the per-connection budget alone holds memory."""
    sla = SLA(h2_max_concurrent_streams=max_streams)
    with backend_process() as port, ProxyThread([("127.0.0.1", port)], sla=sla) as px:
        good = GoodClient(px.port)
        good.start()
        time.sleep(0.3)
        base = rss_mb()
        zero_window = struct.pack(">HI", 0x4, 0)  # SETTINGS_INITIAL_WINDOW_SIZE = 0
        attacker = Attacker(px.port, settings=zero_window)
        attacker.keep_frames = False
        block = b"\x82\x86\x04\x0a/stream/64\x01\x01x"  # GET /stream/64 (4 MiB each)
        try:
            for first in range(1, 2001, 200):
                attacker.send(b"".join(frame(HEADERS, END_STREAM | END_HEADERS, sid, block)
                                       for sid in range(first, first + 200, 2)), 100)  # fmt: skip
            peak = base
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                attacker.poll()  # reads the response heads; the window stays closed
                peak = max(peak, rss_mb())
                time.sleep(0.05)
            growth = peak - base
            print(f"zero-window attack: worker RSS {base:.0f} MB -> peak {peak:.0f} MB")
            assert growth < 100, f"worker RSS grew by {growth:.0f} MB"
        finally:
            attacker.close()
        good.check()


def test_streams_reset_with_queued_response_data_give_the_h2_upstream_its_window_back() -> None:
    """A client with a zero window resets streams whose response (from an h2 upstream) waits in the proxy: the
    dropped bytes are credited to the shared upstream connection. Before, each reset took up to 1 MiB of that
    connection's window for good, and after a few the upstream could send nothing more to anyone."""
    from planemesh.model.config import Cluster, ClusterKind, Endpoint, RouteAction
    from tests.proxy.test_h1_to_h2 import H2Backend

    with H2Backend() as backend:
        endpoint = Endpoint("127.0.0.1", backend.port)
        cluster = Cluster(name="h2", kind=ClusterKind.STATIC, http2=True, endpoints=(endpoint,))
        routes = (Route(action=RouteAction(cluster="h2")),)
        with ProxyThread([("127.0.0.1", backend.port)], routes=routes, clusters={"h2": cluster}) as px:
            path = b"/stream/3000000"
            block = b"\x82\x86\x04" + bytes([len(path)]) + path + b"\x01\x01x"
            for _ in range(6):  # 6 x ~1 MiB > the upstream connection's ~4 MiB window
                attacker = Attacker(px.port, settings=struct.pack(">HI", 0x4, 0))
                attacker.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, block), 1)
                time.sleep(0.4)  # the upstream fills the stream's 1 MiB window; it waits in the proxy
                attacker.send(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)), 1)
                time.sleep(0.1)
                attacker.close()
            assert backend.connections == 1  # every stream went over the same pooled upstream connection
            good = GoodClient(px.port)
            good.path = "/stream/2000000"
            good.start()
            time.sleep(2)
            good.check()


if __name__ == "__main__":  # backend_process(): the child runs this module
    serve_forever()
