"""HTTP/2 client connections under the plane's admission, idle sweep and overload manager (issue 11, finding 7b
and the overload manager, for h2c): the same per-source share and idle deadlines as HTTP/1.1, on a declared port
(h2c prior knowledge switched from the HTTP/1.1 listener) and on the sniffing listener; a refused h2 connection
gets GOAWAY(last stream 0) naming why; under the memory soft level h2 streams are shed with 503 +
`x-planemesh-overloaded: memory` and the connection is told to go away (graceful GOAWAY); past the hard level
the h2 connection holding the biggest buffers is reset. Real sockets on loopback."""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import h2.config
import h2.connection
import h2.events
import pytest

from planemesh.agent.proxy.h2_goaway import GoawaySplitter
from planemesh.agent.proxy.overload import MIB
from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.labs import h2_frames as hf
from planemesh.model.planes import SLA
from tests.proxy.proxy_harness import PLANE, Backend, ProxyThread, ServingProxy, make_snapshot
from tests.proxy.test_h2_abuse import SlowBackend
from tests.support.waiting import eventually as wait_until

pytestmark = pytest.mark.unit

ATTACKER = "127.0.0.2"  # every 127/8 address is the loopback's: a second client address without a netns


class SniffingProxy(ServingProxy):
    """A PlaneProxy whose only listener is the sniffing one (undeclared ports): h2 arrives through
    passthrough.SniffListener, the original destination being the backend."""

    def __init__(self, backend_port: int, sla: SLA, **options: object) -> None:
        sock = make_listener_socket(0, transparent=False, host="127.0.0.1")
        snap = make_snapshot(backend_port, [("127.0.0.1", backend_port)], sla=sla)
        snap = replace(snap, planes=(replace(snap.planes[0], sniff_port=sock.getsockname()[1]),))
        proxy = PlaneProxy(
            snap,
            PLANE,
            tick_s=0.05,
            sniff_timeout_s=0.15,
            original_destination=lambda s, p: ("127.0.0.1", backend_port),
            **options,  # type: ignore[arg-type]
        )
        super().__init__(proxy, sock)


class H2Probe:
    """A raw h2c connection: the preface, then what the test sends; notes every frame and the GOAWAY."""

    def __init__(self, port: int, source: str = "127.0.0.1", settings: dict[int, int] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        self.sock.sendall(hf.client_preface(settings))
        self.reader = hf.FrameReader()
        self.frames: list[hf.Frame] = []
        self.goaway: hf.Frame | None = None
        self.closed = False
        self.reset = False
        self.raw = b""  # the first bytes received (an HTTP/1.1 refusal is no frame)

    def poll(self, timeout: float = 0.0) -> None:
        while not self.closed and select.select([self.sock], [], [], timeout)[0]:
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                self.closed = self.reset = True
                return
            if not data:
                self.closed = True
                return
            if len(self.raw) < 512:
                self.raw += data[:512]
            for f in self.reader.feed(data):
                if f.kind == hf.GOAWAY:
                    self.goaway = f
                self.frames.append(f)
            timeout = 0.0

    def wait(self, check: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not check() and time.monotonic() < deadline:
            self.poll(0.05)
        return check()

    def goaway_fields(self) -> tuple[int, int, bytes]:
        """(last stream id, error code, debug data) of the GOAWAY received."""
        assert self.goaway is not None
        payload = self.goaway.payload
        return struct.unpack(">I", payload[:4])[0] & hf.MAX_STREAM_ID, hf.Frame.goaway_code(self.goaway), payload[8:]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def get_block(path: str) -> bytes:
    return hf.RequestBlocks("x", path).next()


def h2_get(port: int, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    """One GET with a real h2 client: (status, response fields, body). A graceful GOAWAY (the proxy sheds
    keep-alive near its connection budget) is kept from h2, which would refuse the response after it (h2#1181)."""
    splitter = GoawaySplitter()
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", path)],
                            end_stream=True)  # fmt: skip
        sock.sendall(client.data_to_send())
        fields: dict[bytes, bytes] = {}
        body = b""
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed before the response ended")
            for event in client.receive_data(splitter.feed(data)[0]):
                if isinstance(event, h2.events.ResponseReceived):
                    fields = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    client.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return int(fields[b":status"]), fields, body
            sock.sendall(client.data_to_send())


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with Backend() as be:
        yield be


def serving(kind: str, backend: Backend, sla: SLA, **options: object) -> ServingProxy:
    if kind == "sniffed":
        return SniffingProxy(backend.port, sla, **options)
    return ProxyThread([("127.0.0.1", backend.port)], sla=sla, **options)


@pytest.mark.parametrize("listener", ["declared", "sniffed"])
def test_h2_connections_take_their_source_share(backend: Backend, listener: str) -> None:
    """Before: h2 connections skipped the per-source share (on a declared port they were released when they
    switched to h2), so one address could hold the whole plane with them.

    Past the share, a connection on the sniffing listener (known to be h2: its preface was peeked) gets
    GOAWAY(last stream 0, ENHANCE_YOUR_CALM, "source-connections"); on a declared port the refusal happens at
    accept, before any byte says which protocol follows: the HTTP/1.1 503 (see docs/protocols.md)."""
    sla = SLA(max_connections=40, max_connections_per_source=10, idle_connection_timeout_s=60)
    with serving(listener, backend, sla) as px:
        held = [H2Probe(px.port, ATTACKER) for _ in range(10)]
        extra: list[H2Probe] = []
        try:
            for probe in held:  # admitted: the server's SETTINGS, no GOAWAY
                assert probe.wait(lambda p=probe: any(f.kind == hf.SETTINGS for f in p.frames), 5)
            assert wait_until(lambda: px.proxy.share.by_source == {ATTACKER: 10}, 5), px.proxy.share.by_source
            extra = [H2Probe(px.port, ATTACKER) for _ in range(5)]
            for probe in extra:
                assert probe.wait(lambda p=probe: p.closed, 5)
                if listener == "sniffed":
                    assert probe.goaway_fields() == (0, hf.ENHANCE_YOUR_CALM, b"source-connections")
                else:
                    assert probe.raw.startswith(b"HTTP/1.1 503 ") and b"source-connections" in probe.raw
            assert px.proxy.stats.source_refused == 5
            assert not any(p.closed or p.goaway for p in held)
            assert px.proxy.share.by_source == {ATTACKER: 10}
            # another address on the same plane is served, over h2 too
            assert [h2_get(px.port, f"/ok{i}")[0] for i in range(5)] == [200] * 5
        finally:
            for probe in held + extra:
                probe.close()
        assert wait_until(lambda: not px.proxy.share.by_source, 5)  # released when they closed


def test_never_used_and_ping_only_h2_connections_are_closed_with_goaway(backend: Backend) -> None:
    """Before: an h2 connection that never opened a stream stayed forever (no idle sweep for h2). PINGs, which
    the proxy answers, do not count as use (Envoy's idle timeout runs while no stream is active)."""
    timeout_s = 2.0
    sla = SLA(max_connections=40, max_connections_per_source=10, idle_connection_timeout_s=timeout_s)
    with ProxyThread([("127.0.0.1", backend.port)], sla=sla) as px:
        created = time.monotonic()  # the proxy accepted them after this: it may close them no sooner than + 2 s
        quiet = H2Probe(px.port, ATTACKER)
        pinger = H2Probe(px.port, ATTACKER)
        used = H2Probe(px.port)
        used.send(hf.headers(1, get_block("/used")))
        try:
            closed_at = {}
            while len(closed_at) < 2 and time.monotonic() - created < 8:
                if not pinger.closed:
                    pinger.send(hf.ping())
                for name, probe in (("quiet", quiet), ("pinger", pinger)):
                    probe.poll(0.05)
                    if probe.closed and name not in closed_at:
                        closed_at[name] = time.monotonic() - created
            assert set(closed_at) == {"quiet", "pinger"}, closed_at
            assert all(timeout_s <= t < timeout_s + 4 for t in closed_at.values()), closed_at
            assert any(f.kind == hf.PING and f.flags & hf.ACK for f in pinger.frames)  # its PINGs were answered
            for probe in (quiet, pinger):
                assert probe.goaway is not None and probe.goaway_fields()[1] == hf.NO_ERROR
            # A connection that was used waits for the plane's keep-alive idle timeout (300 s), not this one.
            used.poll(0.2)
            assert not used.closed and any(f.kind == hf.HEADERS and f.stream_id == 1 for f in used.frames)
        finally:
            for probe in (quiet, pinger, used):
                probe.close()


def test_idle_h2_connections_are_closed_sooner_under_pressure(backend: Backend) -> None:
    sla = SLA(max_connections=40, max_connections_per_source=10, idle_connection_timeout_s=60)
    with ProxyThread([("127.0.0.1", backend.port)], sla=sla) as px:
        flood = [H2Probe(px.port, f"127.0.0.{i}") for i in range(2, 6) for _ in range(10)]
        try:
            assert wait_until(lambda: len(px.proxy.share) >= 40, 5)
            # Above 3/4 of the budget idle connections get PRESSURED_IDLE_TIMEOUT_S (1 s), not 60 s: closed (the
            # oldest first) until the plane is out of pressure, at least 10 of them.
            deadline = time.monotonic() + 4
            while sum(p.closed for p in flood) < 10 and time.monotonic() < deadline:
                for probe in flood:
                    probe.poll()
                time.sleep(0.05)
            closed = [p for p in flood if p.closed]
            assert len(closed) >= 10 and px.proxy.stats.idle_closed >= 10
            assert all(p.goaway is not None and p.goaway_fields()[1] == hf.NO_ERROR for p in closed)
            assert h2_get(px.port, "/after")[0] == 200
        finally:
            for probe in flood:
                probe.close()


@pytest.mark.parametrize("listener", ["declared", "sniffed"])
def test_memory_soft_level_sheds_h2_streams_and_connections(backend: Backend, listener: str) -> None:
    """Before: h2 streams went on being served (and h2 connections admitted) while HTTP/1.1 was shed."""
    memory = {"rss": 10 * MIB}
    sla = SLA(memory_max_mb=100)
    with serving(listener, backend, sla, memory_source=lambda: memory["rss"], overload_interval_s=0.05) as px:
        kept = H2Probe(px.port)  # a keep-alive h2 client, connected before the pressure
        kept.send(hf.headers(1, get_block("/before")))
        assert kept.wait(lambda: any(f.kind == hf.HEADERS and f.stream_id == 1 for f in kept.frames), 5)
        memory["rss"] = 85 * MIB  # soft (80 %), below hard (95 %)
        try:
            assert wait_until(lambda: px.proxy.stats.overload_level == 1, 3)
            kept.frames.clear()
            kept.send(hf.headers(3, get_block("/during")))
            assert kept.wait(lambda: kept.closed, 5)
            heads = [f for f in kept.frames if f.kind == hf.HEADERS and f.stream_id == 3]
            assert heads, kept.frames
            fields = dict(hf_decode(heads[0].payload))
            assert (fields[b":status"], fields[b"x-planemesh-overloaded"]) == (b"503", b"memory")
            # graceful: the GOAWAY lets stream 3 complete, then the connection closes
            assert kept.goaway_fields()[:2] == (3, hf.NO_ERROR)
            fresh = H2Probe(px.port)  # a new connection: refused before any stream
            assert fresh.wait(lambda: fresh.closed, 5)
            if listener == "sniffed":  # known to be h2 when admitted
                assert fresh.goaway_fields() == (0, hf.REFUSED_STREAM, b"memory")
            else:  # refused at accept, before the first byte: HTTP/1.1's answer
                assert fresh.raw.startswith(b"HTTP/1.1 503 ") and b"x-planemesh-overloaded: memory" in fresh.raw
            fresh.close()
            assert px.proxy.stats.shed_requests >= 1 and px.proxy.stats.shed_connections >= 1
        finally:
            kept.close()
            memory["rss"] = 10 * MIB
        assert wait_until(lambda: px.proxy.stats.overload_level == 0, 3)
        assert h2_get(px.port, "/after")[0] == 200


def hf_decode(block: bytes) -> list[tuple[bytes, bytes]]:
    import hpack

    return [(bytes(n), bytes(v)) for n, v in hpack.Decoder().decode(block, raw=True)]


def test_hard_level_resets_the_h2_connection_buffering_most(backend: Backend) -> None:
    """An h2 client with a zero stream window holding large responses is the biggest buffer: reset at the hard
    level; a quiet h2 client on the same worker is not. Before: h2 connections were never candidates."""
    memory = {"rss": 10 * MIB}
    with ProxyThread(
        [("127.0.0.1", backend.port)],
        sla=SLA(memory_max_mb=100),
        memory_source=lambda: memory["rss"],
        overload_interval_s=0.05,
    ) as px:
        hog = H2Probe(px.port, settings={hf.SETTINGS_INITIAL_WINDOW_SIZE: 0})
        hog.send(b"".join(hf.headers(sid, get_block("/big/4194304")) for sid in range(1, 17, 2)))
        quiet = H2Probe(px.port)
        quiet.send(hf.headers(1, get_block("/q1")))
        assert quiet.wait(lambda: any(f.kind == hf.DATA for f in quiet.frames), 5)

        def biggest() -> tuple[int, str, int]:  # on the proxy's loop: the connections belong to it
            sizes = {c: c.buffered_bytes() for c in px.proxy.connections}
            top = max(sizes, key=sizes.get)  # type: ignore[arg-type]
            return sizes[top], type(top).__name__, len(top.active or ())

        assert wait_until(lambda: px.call(biggest)[0] > 256 * 1024, 5), px.call(biggest)
        assert px.call(biggest)[1:] == ("H2Downstream", 8)  # the hog, with its 8 streams
        memory["rss"] = 99 * MIB  # hard
        assert wait_until(lambda: px.proxy.stats.overload_resets >= 1, 3)
        memory["rss"] = 10 * MIB
        assert hog.wait(lambda: hog.closed, 5) and hog.reset
        assert wait_until(lambda: px.proxy.stats.overload_level == 0, 3)
        # The quiet client was no victim: never reset (while the worker was over its soft level its idle
        # connection may have been closed gracefully, GOAWAY then FIN, as every idle one under pressure).
        quiet.poll(0.1)
        assert not quiet.reset
        assert not quiet.closed or quiet.goaway_fields()[1] == hf.NO_ERROR
        assert h2_get(px.port, "/after")[0] == 200
        hog.close()
        quiet.close()
        assert px.proxy.stats.overload_resets == 1


def test_drain_tells_busy_h2_connections_to_go_away_and_completes_their_streams() -> None:
    """Before: drain did not see h2 connections (they were not in the proxy's connections): no GOAWAY, new streams
    accepted during the drain, and whatever was in flight at its end cut off."""
    with SlowBackend() as backend:
        px = ProxyThread([("127.0.0.1", backend.port)]).__enter__()
        drained = None
        try:
            client = H2Probe(px.port)
            client.send(hf.headers(1, get_block("/hold/1.5")))
            assert wait_until(lambda: px.proxy.stats.requests_active == 1, 5)
            drained = asyncio.run_coroutine_threadsafe(px.proxy.drain(10), px.loop)  # what __exit__ would do
            assert client.wait(lambda: client.goaway is not None, 2)
            assert client.goaway_fields()[:2] == (1, hf.NO_ERROR)  # stream 1 will be answered, nothing after it
            client.send(hf.headers(3, get_block("/late")))
            assert client.wait(lambda: client.closed, 8)
            refused = [f for f in client.frames if f.kind == hf.RST_STREAM and f.stream_id == 3]
            assert refused and int.from_bytes(refused[0].payload, "big") == hf.REFUSED_STREAM
            heads = [f for f in client.frames if f.kind == hf.HEADERS and f.stream_id == 1]
            assert heads and dict(hf_decode(heads[0].payload))[b":status"] == b"200"
            assert any(f.kind == hf.DATA and f.stream_id == 1 and f.flags & hf.END_STREAM for f in client.frames)
            drained.result(timeout=10)
            client.close()
        finally:
            if drained is None:
                px.__exit__(None, None, None)
            else:
                px.thread.join(timeout=10)
                px.sock.close()
