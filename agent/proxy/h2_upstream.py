"""Upstreams of h2 streams: pooled, multiplexed h2c connections (clusters with http2=True), else pooled
HTTP/1.1 connections, one in-flight request each (the HTTP/1 path's UpstreamPool). Both carry the proxy's
SO_MARK and the plane's source address."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import h2.errors
import h2.events
import h2.exceptions

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.h2 import H2Side
from planemesh.agent.proxy.http1 import (
    HOP_BY_HOP,
    LAST_CHUNK,
    NEVER_HOP_BY_HOP,
    TRAILER_DROP,
    last_chunk,
)
from planemesh.agent.proxy.retry import MAX_REPLAY_BODY
from planemesh.agent.proxy.sockets import open_upstream
from planemesh.agent.proxy.tls_context import originate_tls
from planemesh.model.tls_config import endpoint_tls

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import H2Client as H2Downstream
    from planemesh.agent.proxy.contracts import H2StreamUser as Bridge
    from planemesh.agent.proxy.contracts import Proxy as PlaneProxy
    from planemesh.agent.proxy.contracts import UpstreamConn as UpstreamConnection
    from planemesh.agent.proxy.messages import ResponseHead

MAX_STREAMS_PER_CONN = 1000
# Streams opened on a new h2c connection before the server's SETTINGS arrive (nghttp2's assumed peer default):
# above the server's real limit, the surplus would be refused.
STREAMS_BEFORE_SETTINGS = 100
MAX_REOPEN = 5  # times a refused body-less stream is opened again (a server past its streams per connection)
# What of an h2 request's fields is not copied into the HTTP/1.1 head: hop-by-hop and framing fields (re-emitted
# by the proxy) and Host (written from :authority, or the first Host when there is none).
_H1_DROP = HOP_BY_HOP | NEVER_HOP_BY_HOP


def open_stream(bridge: Bridge, addr: tuple[str, int], ended: bool, http2: bool, connect_timeout: float) -> None:
    if http2:
        bridge.ds.proxy.h2_pool.open(bridge, addr, ended, connect_timeout)
    else:
        H1Stream(bridge, addr, ended, connect_timeout)


class H2Pool:
    """A plane proxy's h2c (and h2 over TLS) upstream connections, per (address, port, source, mark[, TLS]):
    owned by the PlaneProxy (server.py), whose drain() closes them with close_all()."""

    def __init__(self, proxy: PlaneProxy) -> None:
        self.proxy = proxy
        self.conns: dict[tuple, list[H2Upstream]] = {}

    def open(self, bridge: Bridge, addr: tuple[str, int], ended: bool, connect_timeout: float) -> None:
        """A stream for `bridge` on the first connection to `addr` with a free stream (a new one when none)."""
        proxy = self.proxy
        key, _ = proxy.pool.key_for(addr)
        cluster = getattr(bridge, "cluster", None)  # h2_stream.Bridge, h1_over_h2.H2Stream
        if cluster is not None and (tls := endpoint_tls(cluster, bridge.endpoint, addr)) is not None:
            key = (*key, tls)  # h2 over TLS (agent/proxy/tls_context.py): its own connections
        conns = self.conns.get(key)
        if conns is None:
            conns = self.conns[key] = []
        for conn in conns:  # the first connection with a free stream
            if conn.has_capacity():
                break
        else:
            conn = H2Upstream(proxy, key, conns, connect_timeout)
            conns.append(conn)
        conn.open(bridge, bridge.upstream_headers(), ended)

    def close_all(self) -> None:
        """Close every connection (drain's end): those still connecting are cancelled, their streams fail."""
        conns = [conn for pool in self.conns.values() for conn in pool]
        self.conns.clear()
        for conn in conns:
            conn.shut()


async def _connect(proxy: PlaneProxy, key: tuple, timeout: float, factory) -> None:
    host, port, source, mark = key[:4]
    sock = await open_upstream(host, port, mark=mark, source=source, timeout=timeout)
    if len(key) > 4:  # TLS origination: handshake, then the server's SANs (closes the socket on failure)
        await originate_tls(proxy, sock, key[4], factory, timeout)
        return
    try:
        await proxy.loop.connect_accepted_socket(factory, sock)
    except BaseException:
        sock.close()
        raise


class H2Upstream(H2Side):
    """A pooled h2c connection to one endpoint; streams are multiplexed while it has capacity.

    A server's GOAWAY (reported by the codec, which goes on taking frames): no new streams, the ones above its last
    stream id were not processed (a body-less one is opened again on another connection, RFC 9113 8.7), the
    others complete, then the connection closes.
    """

    client_side = True

    def __init__(self, proxy: PlaneProxy, key: tuple, pool: list[H2Upstream], timeout: float) -> None:
        super().__init__(proxy)
        self.key = key
        self.pool = pool
        self.timeout = timeout
        self.goaway = False
        self.settings_received = False
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

    def shut(self) -> None:
        """Closed by its pool (the proxy's drain): a connect in progress is cancelled (its streams fail)."""
        if not self.task.done():
            self.task.cancel()
        self.close()

    def has_capacity(self) -> bool:
        if self.closed or self.goaway:
            return False
        if not self.settings_received:
            return len(self.bridges) < STREAMS_BEFORE_SETTINGS
        limit = min(self.conn.peer_max_concurrent_streams, MAX_STREAMS_PER_CONN)
        return len(self.bridges) < limit

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.goaway and not self.bridges and not self.closed:
            self.close()

    def on_goaway(self, last_stream_id: int) -> None:
        self.goaway = True
        self._forget()
        super().on_goaway(last_stream_id)

    def reopen(self, bridge: Bridge) -> bool:
        """A stream this server refused (not processed): open it again elsewhere when nothing but its headers
        went out (at most MAX_REOPEN times: a server may refuse everything)."""
        if bridge.reopened >= MAX_REOPEN or not bridge.req_ended or bridge.bytes_rx:
            return False
        bridge.reopened += 1
        self.bridges.pop(bridge.up_sid, None)
        try:
            self.conn.reset_stream(bridge.up_sid, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:
            pass
        if self.goaway and not self.bridges:
            self.close()
        open_stream(bridge, (self.key[0], self.key[1]), True, True, self.timeout)
        return True

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
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_received = True
        super().handle(event)

    # ---- what a Bridge calls --------------------------------------------------------------------------

    def send_body(self, bridge: Bridge, data: bytes, end: bool, on_sent) -> None:
        self.send(bridge.up_sid, data, end, on_sent)

    def send_trailers(self, bridge: Bridge, trailers: list[tuple[bytes, bytes]]) -> None:
        self.send(bridge.up_sid, list(trailers), True)  # type: ignore[arg-type]

    def cancel(self, bridge: Bridge) -> None:
        self.reset(bridge.up_sid)

    def buffered_for(self, bridge: Bridge) -> int:
        """Request bytes of the stream waiting for this connection's window (the overload manager's measure)."""
        queue = self.queues.get(bridge.up_sid)
        return sum(len(item[0]) for item in queue if type(item[0]) is not list) if queue else 0

    def release(self, bridge: Bridge) -> None:
        self.bridges.pop(bridge.up_sid, None)
        if self.goaway and not self.bridges:
            self.close()


class H1Stream:
    """One h2 stream's request on a pooled HTTP/1.1 connection: the HTTP/1 path's UpstreamPool (per endpoint,
    source and mark; idle timeout; max idle per key).

    UpstreamPool and UpstreamConnection drive it through the callbacks they drive an Exchange with. A connection
    goes back to the pool only after a complete response to a completely sent request, both with keep-alive and
    not delimited by the close; errors, `connection: close`, a cancelled stream or a partly read body close it.
    """

    __slots__ = (
        "addr",
        "body",
        "bridge",
        "chunked",
        "close_delimited",
        "conn",
        "connect_task",
        "ds",
        "finished",
        "h2ds",
        "held_acks",
        "is_head",
        "keep_alive",
        "out",
        "pending",
        "queued_down",
        "reading",
        "replay",
        "replay_len",
        "req_done",
        "resp_started",
        "retried",
        "timeout",
        "trailers",
        "upstream_host",
        "upstream_key",
        "write_paused",
    )

    @property
    def cluster(self) -> Any:  # the pool's TLS origination reads the cluster and endpoint of the request
        return self.bridge.cluster

    @property
    def endpoint(self) -> Any:
        return self.bridge.endpoint

    def __init__(self, bridge: Bridge, addr: tuple[str, int], ended: bool, timeout: float) -> None:
        self.bridge = bridge
        self.h2ds = bridge.ds
        self.ds = self  # UpstreamConnection reaches flushes and write back-pressure through `exchange.ds`
        self.addr = addr
        self.timeout = timeout
        self.conn: UpstreamConnection | None = None
        self.connect_task = None
        self.pending = False
        self.finished = False
        self.upstream_host: str | None = None
        self.upstream_key: tuple | None = None
        self.req_done = ended
        self.resp_started = False
        self.keep_alive = True
        self.close_delimited = False
        self.retried = False
        self.write_paused = False
        self.held_acks: list = []
        self.queued_down = 0
        self.reading = False  # holds one of the client connection's upstream reading slots (h2_guard.py)
        self.body: list[bytes] = []  # response body read, not yet handed to the h2 stream
        self.trailers: list[tuple[bytes, bytes]] | None = None
        method = bridge.method_b or b"GET"
        host = bridge.up_authority
        has_length = False
        fields = []
        for n, v in bridge.fields:
            if n not in _H1_DROP:
                fields += (n, b": ", v, b"\r\n")
            elif n == b"content-length":
                has_length = True
                fields += (b"content-length: ", v, b"\r\n")
            elif n == b"host" and host is None:
                host = v
        self.is_head = method == b"HEAD"
        self.chunked = not ended and not has_length
        if self.chunked:
            fields.append(b"transfer-encoding: chunked\r\n")
        path = bridge.up_path or b"/"
        head = b"".join((method, b" ", path, b" HTTP/1.1\r\nhost: ", host or b"", b"\r\n", *fields, b"\r\n"))
        self.out = [head]
        self.replay: list[bytes] | None = [head]  # the request so far, while small enough to send again
        self.replay_len = 0
        bridge.up = self
        bridge.ds.proxy.pool.acquire_for(self, addr, timeout)  # type: ignore[arg-type]

    # ---- the request (what a Bridge calls) --------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            self.out.append(data)
        else:
            conn.transport.write(data)
        replay = self.replay
        if replay is not None:
            self.replay_len += len(data)
            if self.replay_len > MAX_REPLAY_BODY:
                self.replay = None
            else:
                replay.append(data)

    def send_body(self, bridge: Bridge, data: bytes, end: bool, on_sent) -> None:
        if self.finished:
            if on_sent is not None and data:
                on_sent(len(data))
            return
        if data:
            self._write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
            if on_sent is not None:
                if self.write_paused or self.conn is None:
                    self.held_acks.append((on_sent, len(data)))
                else:
                    on_sent(len(data))
        if end and not self.req_done:
            self.req_done = True
            if self.chunked:
                self._write(LAST_CHUNK)

    def send_trailers(self, bridge: Bridge, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.finished or self.req_done:
            return
        self.req_done = True
        if self.chunked:  # a content-length body has nowhere to carry trailers: dropped
            self._write(last_chunk(trailers))

    def buffered_for(self, bridge: Bridge) -> int:
        """Bytes held for the stream (the overload manager's measure): the request before the connection is open,
        its replay copy, the response read but not handed on, and the connection's write buffer."""
        n = sum(map(len, self.out)) + sum(map(len, self.body))
        if self.replay is not None:
            n += self.replay_len
        conn = self.conn
        if conn is not None and conn.transport is not None:
            n += conn.transport.get_write_buffer_size()
        return n

    def cancel(self, bridge: Bridge) -> None:
        """The client reset the stream, or its timeout fired: the connection is dropped, never reused, and a
        connection still being opened for it is not opened (rapid reset must not fan out to the upstream)."""
        task = self.connect_task
        if task is not None and not task.done():
            task.cancel()
        self._abort()

    def release(self, bridge: Bridge) -> None:
        """The Bridge finished; unless the response completed (the connection is pooled already), drop it."""
        self._abort()

    def _abort(self) -> None:
        self._leave()
        if self.finished:
            return
        self.finished = True
        self.connect_task = None  # the pool keeps a connection that arrives late
        if self.body:  # read, never handed to the client: out of the connection's budget
            pending = sum(map(len, self.body))
            self.body.clear()
            self.queued_down -= pending
            self.h2ds.guard.buffered -= pending
        if self.pending:
            self.pending = False
            self.h2ds.proxy.stats.requests_pending -= 1
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.close()
        self._release_acks()

    def _release_acks(self) -> None:
        acks, self.held_acks = self.held_acks, []
        for on_sent, n in acks:
            on_sent(n)

    # ---- UpstreamPool / UpstreamConnection callbacks ------------------------------------------------------

    def on_connected(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.exchange = self  # type: ignore[assignment]
        if not self.reading:
            self.h2ds.paused_up.pop(self, None)  # a retry on a fresh connection decides afresh
            guard = self.h2ds.guard
            if self._client_window_open() and not guard.over_budget():
                pass  # what arrives goes on to the client at once: read freely (a slow response holds no slot)
            elif guard.may_read():
                self.reading = True
                guard.readers += 1
            else:  # the client's connection holds its budget already: read nothing yet
                conn.pause_reading()
                self.h2ds.paused_up[self] = None
        out = self.out
        if out:
            conn.transport.write(b"".join(out) if len(out) > 1 else out[0])
            self.out = []
        if not self.write_paused:
            self._release_acks()

    def _client_window_open(self) -> bool:
        try:
            return self.h2ds.conn.local_flow_control_window(self.bridge.sid) > 0
        except h2.exceptions.StreamClosedError:
            return False

    def on_connect_failed(self, timed_out: bool) -> None:
        self.h2ds.proxy.stats.upstream_connect_failures += 1
        self.bridge.up_failed(503, "upstream connect error", flags.UF)

    def overloaded(self, which: bytes) -> None:
        self.h2ds.proxy.stats.overloaded += 1
        self.bridge.up_failed(503, "overloaded", flags.UO)

    def flush(self) -> None:
        """UpstreamConnection read and parsed a piece of the response: pass its body on."""
        if self.body and not self.finished:
            bridge = self.bridge
            bridge.ds.send(bridge.sid, self._body_out(), False, self._sent_down)

    def pause_for_upstream(self) -> None:  # the upstream is slow to take the body: hold the client's credit
        self.write_paused = True

    def resume_for_upstream(self) -> None:
        self.write_paused = False
        self._release_acks()

    def on_response_head(self, head: ResponseHead) -> None:
        status = head.status
        if self.finished or status < 200:
            return  # interim responses (100 Continue, 103) are not relayed
        if self.bridge.retry_status(status):
            return  # retried: this attempt (and its connection) is dropped
        self.resp_started = True
        self.keep_alive = head.reusable
        if head.until_close and not self.is_head and status != 204 and status != 304:
            self.close_delimited = True  # the body ends with the connection
        out = [(b":status", _status_bytes(status))]
        out += [(n, v) for n, v in head.fields if n not in NEVER_HOP_BY_HOP]  # no Host in a response to h2
        if head.length is not None:
            out.append((b"content-length", b"%d" % head.length))
        self.bridge.status = status
        self.bridge.respond(out, False)

    def on_response_body(self, data: bytes) -> None:
        """Body bytes wait for the end of this read (flush) or of the response: one DATA frame, END_STREAM on
        the last, instead of a frame per parser callback and an empty one to end the stream."""
        if self.finished:
            return
        self.bridge.bytes_tx += len(data)
        self.body.append(data)
        self.queued_down += len(data)
        guard = self.h2ds.guard
        guard.buffered += len(data)
        # Bounded per stream and per client connection (a client with a zero window and many streams): the
        # upstream is not read until the client takes what waits.
        conn = self.conn
        if conn is not None and (self.queued_down > guard.limits.buffer_limit_bytes or guard.over_budget()):
            conn.pause_reading()
            self._leave()
            self.h2ds.paused_up[self] = None

    def _body_out(self) -> bytes:
        body = self.body
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        return data

    def _sent_down(self, n: int) -> None:
        self.queued_down -= n
        h2ds = self.h2ds
        h2ds.guard.buffered -= n
        if h2ds.paused_up and h2ds.guard.may_read():
            wake_readers(h2ds)

    def _resume(self) -> bool:
        """Read the upstream again (taking a reading slot), unless this stream holds half its own budget still.
        False: it stays paused."""
        conn = self.conn
        guard = self.h2ds.guard
        if conn is not None and self.queued_down >= guard.limits.buffer_limit_bytes // 2:
            return False
        del self.h2ds.paused_up[self]
        if conn is not None:
            self.reading = True
            guard.readers += 1
            conn.resume_reading()
        return True

    def _leave(self) -> None:
        """Give back the reading slot (paused, or done) and let a waiting stream have it."""
        h2ds = self.h2ds
        h2ds.paused_up.pop(self, None)
        if self.reading:
            self.reading = False
            h2ds.guard.readers -= 1
            if h2ds.paused_up and h2ds.guard.may_read():
                wake_readers(h2ds)

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.trailers = [(n, v) for n, v in trailers if n not in TRAILER_DROP]

    def on_response_complete(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._leave()
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.exchange = None
            if self.keep_alive and self.req_done and not self.close_delimited:
                self.h2ds.proxy.pool.release(conn)
            else:
                conn.close()
        self._end_stream()

    def _end_stream(self) -> None:
        bridge = self.bridge
        data = self._body_out()
        if self.trailers:
            if data:
                bridge.ds.send(bridge.sid, data, False, self._sent_down)
            bridge.ds.send(bridge.sid, self.trailers, True)
        else:
            bridge.ds.send(bridge.sid, data, True, self._sent_down if data else None)
        bridge.finish("")

    def on_upstream_lost(self, conn: UpstreamConnection) -> None:
        if self.finished:
            return
        self.conn = None
        if self.resp_started:
            if self.close_delimited:  # the close is the body's end
                self.finished = True
                self._end_stream()
            else:
                self.bridge.up_failed(502, "upstream connection closed", flags.UC)
            return
        # A pooled connection the server had closed meanwhile: once more on a fresh one, when the request can be
        # sent again (the HTTP/1 path's rule).
        if conn.reused and not self.retried and self.replay is not None:
            self.retried = True
            self.out = list(self.replay)
            self.h2ds.proxy.pool.connect_for(self, self.addr, self.timeout)  # type: ignore[arg-type]
            return
        self.bridge.up_failed(502, "upstream connection closed", flags.UC)

    def on_upstream_protocol_error(self) -> None:
        if self.finished:
            return
        self.bridge.up_failed(502, "upstream protocol error", flags.UPE)  # -> release() closes the connection

    def on_upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        conn.close()  # a switch nobody asked for
        self.on_upstream_protocol_error()


def wake_readers(h2ds: H2Downstream) -> None:
    """The client connection's budget allows more upstream reads: resume paused streams, oldest first, while it
    does. A stream still holding half its own budget goes to the back (few can: they share the budget)."""
    paused = h2ds.paused_up
    guard = h2ds.guard
    skipped = 0
    while paused and skipped < len(paused) and guard.may_read():
        stream = next(iter(paused))
        if not stream._resume():
            del paused[stream]
            paused[stream] = None
            skipped += 1


def _status_bytes(status: int) -> bytes:
    found = _STATUS.get(status)
    if found is None:
        found = _STATUS[status] = str(status).encode()  # llhttp: 3 digits, so the memo stays small
    return found


_STATUS: dict[int, bytes] = {}


__all__ = ["H1Stream", "H2Pool", "H2Side", "H2Upstream", "open_stream"]
