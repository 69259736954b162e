"""One HBONE HTTP/2 connection (over the mTLS transport) and the plaintext TCP sockets its CONNECT streams carry.

The h2 state machine is python-hyper's `h2` (sans-IO); this module is the I/O around it. Each stream is bridged
to one TCP socket (`TcpSide`): bytes from the socket become DATA frames within the peer's flow-control window,
DATA from the peer is written to the socket and acknowledged (WINDOW_UPDATE) only while the socket takes it, so
a slow pod slows its own stream and never buffers without bound. A FIN becomes END_STREAM and back; a reset
either way aborts the other side.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

log = logging.getLogger("planemesh.hbone")


def _data_frame_repr(frame: hyperframe.frame.DataFrame) -> str:
    return f"<{len(frame.data)} bytes>"


# h2 4.x formats `repr(frame)` for a trace log on every received frame even with logging off
# (h2/connection.py `_receive_frame`), and a DATA frame's repr serializes and hex-dumps its whole payload:
# 20 % of a bulk tunnel's CPU (bench note in docs/hbone.md). Its repr shows the length instead (process-wide;
# repr only, nothing parses it).
hyperframe.frame.DataFrame._body_repr = _data_frame_repr  # type: ignore[method-assign]

STREAM_WINDOW = 4 << 20  # per-stream receive window (ztunnel's HTTP2_STREAM_WINDOW_SIZE default)
CONN_WINDOW = 16 << 20  # per-connection receive window (ztunnel's HTTP2_CONNECTION_WINDOW_SIZE default)
# Largest frame we accept (16 KiB is h2's default). Bigger frames cost fewer Python calls per byte; h2's frame
# buffer grows a frame by concatenation, so past 256 KiB the CPU per GiB measured no better (docs/hbone.md).
MAX_FRAME = 256 << 10
MAX_STREAMS = 100  # concurrent CONNECT streams per connection (ztunnel's POOL_MAX_STREAMS_PER_CONNECTION)
PENDING_HIGH = 256 << 10  # bytes waiting for window before the source socket stops being read


class TcpSide(asyncio.Protocol):
    """The plaintext end of one tunnel: a captured client socket or the connection to the destination pod."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.conn: HboneConnection | None = None
        self.stream_id = 0
        self.paused = False  # the socket's send buffer is full: hold WINDOW_UPDATEs
        self.unacked = 0
        self.local_eof = self.remote_eof = self.closed = False
        self.bytes_up = self.bytes_down = 0  # to the tunnel / from the tunnel
        self.on_close: Callable[[TcpSide, BaseException | None], None] | None = None
        self.on_open: Callable[[], None] | None = None  # called when the socket connects, before any byte
        self.ready = False  # the tunnel is open (200 sent or received): the socket may be read
        self.held = bytearray()  # socket bytes read before the tunnel opened
        self.early = bytearray()  # tunnel bytes that came before the socket connected (not acknowledged yet)

    def bind(self, conn: HboneConnection, stream_id: int) -> None:
        self.conn, self.stream_id = conn, stream_id

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.on_open is not None:
            self.on_open()
        if self.early:
            early, self.early = bytes(self.early), bytearray()
            self.tunnel_data_written(early)
        if self.remote_eof and transport.can_write_eof():  # type: ignore[attr-defined]
            transport.write_eof()  # type: ignore[attr-defined]

    def tunnel_data_written(self, data: bytes) -> None:
        assert self.transport is not None
        self.bytes_down += len(data)
        self.transport.write(data)
        if not self.paused:
            self.resume_writing()

    def data_received(self, data: bytes) -> None:
        self.bytes_up += len(data)
        if self.conn is None or not self.ready:  # read before the tunnel opened (uvloop may start reading
            self.held += data  # despite a pause in connection_made): keep it for start()
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self.conn.send_data(self.stream_id, data)

    def eof_received(self) -> bool:
        self.local_eof = True
        if self.conn is not None and self.ready:
            self.conn.end_stream(self.stream_id)
        self._maybe_close()
        return True  # keep the write half open: the other direction may still be flowing

    def start(self) -> None:
        """The tunnel is open: send what was read meanwhile, then read on."""
        self.ready = True
        assert self.conn is not None
        if self.held:
            held, self.held = bytes(self.held), bytearray()
            self.conn.send_data(self.stream_id, held)
        if self.local_eof:
            self.conn.end_stream(self.stream_id)
        else:
            self.resume_source()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.conn is not None and not (self.local_eof and self.remote_eof):
            self.conn.reset_stream(self.stream_id)
        if self.on_close is not None:
            self.on_close(self, exc)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.unacked and self.conn is not None:
            self.conn.acknowledge(self.stream_id, self.unacked)
        self.unacked = 0

    # ---- from the tunnel ------------------------------------------------------------------------------
    def tunnel_data(self, data: bytes) -> bool:
        """Write; True when the bytes may be acknowledged now."""
        if self.closed:
            return True
        if self.transport is None:  # still connecting to the destination pod
            self.early += data
            self.unacked += len(data)
            return False
        self.bytes_down += len(data)
        self.transport.write(data)
        if self.paused:
            self.unacked += len(data)
            return False
        return True

    def tunnel_eof(self) -> None:
        self.remote_eof = True
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()
        self._maybe_close()

    def tunnel_reset(self) -> None:
        self.conn = None  # the stream is gone: nothing to reset back
        if self.transport is not None:
            self.transport.abort()

    def pause_source(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_source(self) -> None:
        if self.ready and self.transport is not None and not self.closed and not self.local_eof:
            self.transport.resume_reading()

    def _maybe_close(self) -> None:
        if self.local_eof and self.remote_eof and self.transport is not None:
            self.conn = None
            self.transport.close()


class _Stream:
    __slots__ = ("eof_pending", "opened", "pending", "side")

    def __init__(self, side: TcpSide) -> None:
        self.side = side
        self.pending = bytearray()
        self.eof_pending = False
        self.opened: asyncio.Future[int] | None = None  # client: resolves to the response status


def new_h2(client_side: bool) -> h2.connection.H2Connection:
    """The h2 state machine of one connection (bench/hbone_cpu.py swaps it to measure another codec)."""
    return h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=client_side, header_encoding=None, validate_inbound_headers=True)
    )


class HboneConnection(asyncio.Protocol):
    """Client or server end of one HBONE connection. The server calls `on_request(conn, stream_id, headers)`."""

    def __init__(
        self, client_side: bool, on_request: Callable[[HboneConnection, int, list[Any]], None] | None = None
    ) -> None:
        self.h2 = new_h2(client_side)
        self.client_side = client_side
        self.on_request = on_request
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.goaway = False
        self.write_paused = False
        self.peer_identity: str | None = None
        self.peer_ip = ""
        self.total_streams = 0
        self.last_active = 0.0  # loop time a stream last opened or ended (the pool releases idle connections)
        self.on_lost: Callable[[HboneConnection], None] | None = None

    # ---- asyncio --------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else ""
        s = h2.settings.SettingCodes
        self.h2.local_settings = h2.settings.Settings(
            client=self.client_side,
            initial_values={
                s.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                s.MAX_FRAME_SIZE: MAX_FRAME,
                s.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                s.ENABLE_PUSH: 0,
            },
        )
        # Our settings apply from the first frame (h2 reads them at construction and on SETTINGS ACK only).
        self.h2.max_inbound_frame_size = self.h2.incoming_buffer.max_frame_size = MAX_FRAME
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONN_WINDOW - 65535)
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("HBONE connection from %s: protocol error %s", self.peer_ip, exc)
            self._flush()
            self.abort()
            return
        for event in events:
            self._event(event)
        self._flush()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        for stream in list(self.streams.values()):
            stream.side.tunnel_reset()
            if stream.opened is not None and not stream.opened.done():
                stream.opened.set_exception(ConnectionError("HBONE connection lost"))
        self.streams.clear()
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            stream.side.pause_source()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in self.streams.values():
            if len(stream.pending) < PENDING_HIGH:
                stream.side.resume_source()

    # ---- events ---------------------------------------------------------------------------------------
    def _event(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", 0)
        stream = self.streams.get(sid)
        if isinstance(event, h2.events.DataReceived):
            if stream is None or stream.side.tunnel_data(event.data):
                self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
            elif event.flow_controlled_length > len(event.data):  # padding: acknowledge it now
                self.h2.acknowledge_received_data(event.flow_controlled_length - len(event.data), sid)
        elif isinstance(event, h2.events.RequestReceived) and self.on_request is not None:
            self.total_streams += 1
            self.on_request(self, sid, event.headers)
        elif isinstance(event, h2.events.ResponseReceived) and stream is not None and stream.opened is not None:
            raw = dict(event.headers).get(b":status", b"0")
            status = int(raw) if raw.isdigit() else 0
            if status != 200:  # refused: its body (e.g. Envoy's "RBAC: access denied") never reaches the pod
                self.reset_stream(sid)
                stream.side.conn = None
            if not stream.opened.done():
                stream.opened.set_result(status)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.side.tunnel_eof()
            self._retire(sid)
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            self.streams.pop(sid, None)
            if stream.opened is not None and not stream.opened.done():
                stream.opened.set_result(0)
            stream.side.tunnel_reset()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            for other in list(self.streams):
                self._send_pending(other)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True  # no new streams; open ones finish unless the peer closes the connection
            if event.error_code == 0 and self.streams:
                # RFC 9113 6.8: a graceful GOAWAY (a peer handing over) lets the open streams finish, but h2
                # closes its whole state machine on any GOAWAY: put it back, new streams are ours to refuse.
                cs = h2.connection.ConnectionState
                self.h2.state_machine.state = cs.CLIENT_OPEN if self.client_side else cs.SERVER_OPEN

    def _retire(self, sid: int) -> None:
        """Forget a stream once both directions ended."""
        stream = self.streams.get(sid)
        if stream is not None and stream.side.remote_eof and stream.side.local_eof and not stream.pending:
            del self.streams[sid]
            self.last_active = asyncio.get_running_loop().time()

    # ---- called by the TCP sides and the listeners -----------------------------------------------------
    def open_stream(self, headers: list[tuple[str, str]], side: TcpSide) -> asyncio.Future[int]:
        sid = self.h2.get_next_available_stream_id()
        stream = self.streams[sid] = _Stream(side)
        stream.opened = asyncio.get_running_loop().create_future()
        side.bind(self, sid)
        self.total_streams += 1
        self.last_active = asyncio.get_running_loop().time()
        self.h2.send_headers(sid, headers)
        self._flush()
        return stream.opened

    def attach(self, sid: int, side: TcpSide) -> None:
        self.streams[sid] = _Stream(side)
        side.bind(self, sid)

    def respond(self, sid: int, status: int, end: bool) -> None:
        if self.closed:
            return
        try:
            self.h2.send_headers(sid, [(":status", str(status))], end_stream=end)
        except h2.exceptions.ProtocolError:  # the client reset the stream meanwhile
            self.streams.pop(sid, None)
        self._flush()

    def send_data(self, sid: int, data: bytes) -> None:
        stream = self.streams.get(sid)
        if stream is None or self.closed:
            return
        if not stream.pending and len(data) <= min(
            self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size
        ):
            try:  # the common case: it fits the window in one frame, no copy through `pending`
                self.h2.send_data(sid, data)
            except h2.exceptions.ProtocolError:
                self.streams.pop(sid, None)
                stream.side.tunnel_reset()
        else:
            stream.pending += data
            self._send_pending(sid)
        self._flush()

    def end_stream(self, sid: int) -> None:
        """The socket sent FIN: END_STREAM once the bytes before it are sent."""
        stream = self.streams.get(sid)
        if stream is None or self.closed:
            return
        stream.eof_pending = True
        self._send_pending(sid)
        self._flush()

    def reset_stream(self, sid: int) -> None:
        if self.streams.pop(sid, None) is None or self.closed:
            return
        self.last_active = asyncio.get_running_loop().time()
        try:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:  # already closed (or the connection is)
            pass
        self._flush()

    def acknowledge(self, sid: int, n: int) -> None:
        if self.closed:
            return
        try:
            self.h2.acknowledge_received_data(n, sid)
        except h2.exceptions.StreamClosedError:
            pass  # h2 credits the connection window itself when a stream closes
        self._flush()

    def _send_pending(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return
        try:
            while stream.pending:
                window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = bytes(stream.pending[:window])
                del stream.pending[:window]
                self.h2.send_data(sid, chunk)
            if stream.eof_pending and not stream.pending:
                stream.eof_pending = False
                self.h2.end_stream(sid)
                self._retire(sid)
        except h2.exceptions.ProtocolError:  # the stream or the connection closed under us
            self.streams.pop(sid, None)
            stream.side.tunnel_reset()
            return
        if len(stream.pending) >= PENDING_HIGH or self.write_paused:
            stream.side.pause_source()
        else:
            stream.side.resume_source()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # ---- pool bookkeeping -----------------------------------------------------------------------------
    def can_open(self) -> bool:
        limit = self.h2.remote_settings.max_concurrent_streams
        return not (self.closed or self.goaway) and self.h2.open_outbound_streams < limit

    def drain(self) -> None:
        """Server side, handing over: a GOAWAY (NO_ERROR, the last stream the peer opened) so the peer's pool opens
        its next tunnels on a new connection (to the node that took over) while the open ones finish here.
        Written past h2's state machine, which would refuse to send anything after its own GOAWAY."""
        if self.closed or self.goaway or self.transport is None or self.transport.is_closing():
            return
        self.goaway = True
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = self.h2.highest_inbound_stream_id
        frame.error_code = 0
        self._flush()
        self.transport.write(frame.serialize())

    def close(self) -> None:
        self.goaway = True  # no new streams on it from now on
        if not self.closed and self.transport is not None:
            self.h2.close_connection()
            self._flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
