"""Upstreams of h2 streams: pooled, multiplexed h2c connections (clusters with http2=True), else one
HTTP/1.1 connection per stream. Both carry the proxy's SO_MARK and the plane's source address."""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING

import h2.events
import h2.exceptions
from httptools import HttpParserError, HttpResponseParser

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.h2 import WINDOW, H2Side
from planemesh.agent.proxy.http1 import TRAILER_DROP
from planemesh.agent.proxy.sockets import open_upstream

if TYPE_CHECKING:
    from planemesh.agent.proxy.h2 import Bridge
    from planemesh.agent.proxy.server import PlaneProxy

MAX_STREAMS_PER_CONN = 1000
_H1_DROP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
                      b"content-length", b"te", b"trailer", b"host"})
_pools: weakref.WeakKeyDictionary[PlaneProxy, dict[tuple, list[H2Upstream]]] = weakref.WeakKeyDictionary()


def open_stream(bridge: Bridge, addr: tuple[str, int], headers: list[tuple[bytes, bytes]], ended: bool,
                http2: bool, connect_timeout: float) -> None:
    proxy = bridge.ds.proxy
    source, mark = proxy.upstream_binding(addr[0])
    key = (addr[0], addr[1], source, mark)
    if http2:
        conns = _pools.setdefault(proxy, {}).setdefault(key, [])
        conn = next((c for c in conns if c.has_capacity()), None)
        if conn is None:
            conn = H2Upstream(proxy, key, conns, connect_timeout)
            conns.append(conn)
        conn.open(bridge, headers, ended)
    else:
        H1StreamUpstream(bridge, key, headers, ended, connect_timeout)


async def _connect(proxy: PlaneProxy, key: tuple, timeout: float, factory) -> None:
    host, port, source, mark = key
    sock = await open_upstream(host, port, mark=mark, source=source, timeout=timeout)
    try:
        await proxy.loop.connect_accepted_socket(factory, sock)
    except BaseException:
        sock.close()
        raise


class H2Upstream(H2Side):
    client_side = True

    def __init__(self, proxy: PlaneProxy, key: tuple, pool: list[H2Upstream], timeout: float) -> None:
        super().__init__(proxy)
        self.key = key
        self.pool = pool
        self.goaway = False
        self._init_conn()
        proxy.stats.upstream_total += 1
        self.task = proxy.loop.create_task(_connect(proxy, key, timeout, lambda: self))
        self.task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self.proxy.stats.upstream_connect_failures += 1
            self._forget()
            self.closed = True
            for bridge in list(self.bridges.values()):
                bridge.up = None
                bridge.up_failed(503, "upstream connect error", flags.UF)
            self.bridges.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy.stats.upstream_active += 1
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.stats.upstream_active -= 1
        self._forget()
        super().connection_lost(exc)

    def _forget(self) -> None:
        if self in self.pool:
            self.pool.remove(self)

    def has_capacity(self) -> bool:
        if self.closed or self.goaway:
            return False
        limit = min(self.conn.remote_settings.max_concurrent_streams, MAX_STREAMS_PER_CONN)
        return len(self.bridges) < limit

    def on_goaway(self, last_stream_id: int) -> None:
        self.goaway = True
        self._forget()
        super().on_goaway(last_stream_id)

    def open(self, bridge: Bridge, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=ended)
        self.bridges[sid] = bridge
        bridge.up = self
        bridge.up_sid = sid
        self.flush()

    def handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            bridge = self.bridges.get(event.stream_id)
            if bridge is not None:
                bridge.on_response_headers(event.headers, event.stream_ended is not None)
            return
        super().handle(event)

    # ---- what a Bridge calls --------------------------------------------------------------------------

    def send_body(self, bridge: Bridge, data: bytes, end: bool, on_sent) -> None:
        self.send(bridge.up_sid, data, end, on_sent)

    def send_trailers(self, bridge: Bridge, trailers: list[tuple[bytes, bytes]]) -> None:
        self.send(bridge.up_sid, list(trailers), True)  # type: ignore[arg-type]

    def cancel(self, bridge: Bridge) -> None:
        self.reset(bridge.up_sid)

    def release(self, bridge: Bridge) -> None:
        self.bridges.pop(bridge.up_sid, None)
        if self.goaway and not self.bridges:
            self.close()


class H1StreamUpstream(asyncio.Protocol):
    """One HTTP/1.1 request per connection for one h2 stream (no pooling: correct and simple first)."""

    def __init__(self, bridge: Bridge, key: tuple, headers: list[tuple[bytes, bytes]], ended: bool,
                 timeout: float) -> None:
        self.bridge = bridge
        self.proxy = bridge.ds.proxy
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.write_paused = False
        self.held_acks: list = []
        self.queued_down = 0
        self.reading_paused = False
        self.parser = HttpResponseParser(self)
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.chunked = not ended and not any(n == b"content-length" for n, _ in headers)
        self.done = False
        bridge.up = self
        pseudo = {n: v for n, v in headers if n.startswith(b":")}
        parts = [pseudo.get(b":method", b"GET"), b" ", pseudo.get(b":path", b"/"), b" HTTP/1.1\r\n",
                 b"host: ", pseudo.get(b":authority", b""), b"\r\n"]
        for n, v in headers:
            if not n.startswith(b":") and n not in _H1_DROP:
                parts += (n, b": ", v, b"\r\n")
        for n, v in headers:
            if n == b"content-length":
                parts += (b"content-length: ", v, b"\r\n")
        if self.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        self.out.append(b"".join(parts))
        self.task = self.proxy.loop.create_task(_connect(self.proxy, key, timeout, lambda: self))
        self.task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self.proxy.stats.upstream_connect_failures += 1
            self.bridge.up = None
            self.bridge.up_failed(503, "upstream connect error", flags.UF)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy.stats.upstream_active += 1
        self.proxy.stats.upstream_total += 1
        if self.done:
            transport.close()
            return
        self.transport.write(b"".join(self.out))
        self.out.clear()

    def _write(self, data: bytes) -> None:
        if self.transport is None:
            self.out.append(data)
        elif not self.transport.is_closing():
            self.transport.write(data)

    def send_body(self, bridge: Bridge, data: bytes, end: bool, on_sent) -> None:
        if data:
            self._write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        if end and self.chunked:
            self._write(b"0\r\n\r\n")
        if on_sent is not None and data:
            if self.write_paused or self.transport is None:
                self.held_acks.append((on_sent, len(data)))
            else:
                on_sent(len(data))

    def send_trailers(self, bridge: Bridge, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.chunked:
            self._write(b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n")

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        acks, self.held_acks = self.held_acks, []
        for on_sent, n in acks:
            on_sent(n)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            self.bridge.up_failed(502, "upstream protocol error", flags.UPE)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.stats.upstream_active -= 1
        if not self.done:
            self.done = True
            self.bridge.up_failed(502, "upstream connection closed", flags.UC)

    def cancel(self, bridge: Bridge) -> None:
        self.close()

    def release(self, bridge: Bridge) -> None:
        self.close()

    def close(self) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.close()
        else:
            self.task.cancel()

    # ---- httptools callbacks ----------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.resp_headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.resp_headers = []
            return
        headers = [(b":status", str(status).encode())]
        headers += [(n, v) for n, v in self.resp_headers if n not in _H1_DROP or n == b"content-length"]
        self.resp_headers = []
        self.bridge.on_response_headers(headers, False)

    def on_body(self, data: bytes) -> None:
        bridge = self.bridge
        bridge.bytes_tx += len(data)
        self.queued_down += len(data)
        if self.queued_down > WINDOW and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        bridge.ds.send(bridge.sid, data, False, self._sent_down)

    def _sent_down(self, n: int) -> None:
        self.queued_down -= n
        if self.reading_paused and self.queued_down < WINDOW // 2 and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return
        bridge = self.bridge
        self.done = True
        # Header callbacks after the head were a chunked body's trailers: they become the stream's trailers.
        trailers = [(n, v) for n, v in self.resp_headers if n not in TRAILER_DROP]
        bridge.ds.send(bridge.sid, trailers if trailers else b"", True)  # type: ignore[arg-type]
        bridge.finish("")


__all__ = ["H1StreamUpstream", "H2Side", "H2Upstream", "open_stream"]
