"""The proxy's HTTP/2 codec, either side, without I/O (RFC 9113): bytes in -> stream events, calls -> bytes out.

It replaces the `h2` library on the proxy's hot paths (client connections and h2c upstreams), where h2's
generality (a state machine object per stream, hyperframe frame objects, enum flags, header validation the proxy
switches off) cost about 40% of a worker's time per request. Its API is the subset of `h2.connection.H2Connection`
that H2Side uses and its events are h2's event classes (plain records), so the connection code and the request
streams did not change with it. HPACK: h2_hpack_decode's memoising decoder and h2_hpack's encoder (dynamic
table included).

What it checks, each a connection error (GOAWAY with the code, then ProtocolError) unless said otherwise:
frame sizes (FRAME_SIZE_ERROR), frames on stream 0 that must not be and the reverse, frames on idle streams,
even (server side) or decreasing client stream ids, CONTINUATION out of sequence or beyond CONTINUATION_BACKLOG
frames, padding longer than the payload, bad SETTINGS values, PUSH_PROMISE (never enabled: PROTOCOL_ERROR),
undecodable HPACK (COMPRESSION_ERROR), a header list past the advertised size (ENHANCE_YOUR_CALM), flow-control
violations (FLOW_CONTROL_ERROR), more streams than `enforced_streams` at once (PROTOCOL_ERROR). Stream errors
(RST_STREAM, reported as a StreamReset with remote_reset False, as h2 does): DATA or HEADERS after the peer ended
the stream (STREAM_CLOSED), a stream WINDOW_UPDATE of 0 (PROTOCOL_ERROR) or past 2^31-1 (FLOW_CONTROL_ERROR).

Receive flow control: bytes the proxy acknowledges (acknowledge_received_data, once forwarded) are credited back
with WINDOW_UPDATE once they reach half the window, as h2 does; DATA on a closed stream is reported like any
other (and so acknowledged by the connection code, crediting the connection).
A GOAWAY received is reported and changes nothing else: the streams it lets complete do (RFC 9113 6.8).
"""

from __future__ import annotations

import struct

import h2.events as ev
import h2.exceptions
from hpack import HPACKError, OversizedHeaderListError

from planemesh.agent.proxy.h2_hpack import Encoder
from planemesh.agent.proxy.h2_hpack_decode import MemoDecoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
FRAME_SIZE_ERROR, STREAM_CLOSED, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 6, 5, 9, 11
SETTING_HEADER_TABLE_SIZE, SETTING_ENABLE_PUSH, SETTING_MAX_CONCURRENT_STREAMS = 1, 2, 3
SETTING_INITIAL_WINDOW_SIZE, SETTING_MAX_FRAME_SIZE, SETTING_MAX_HEADER_LIST_SIZE = 4, 5, 6
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
DEFAULT_FRAME_SIZE = 16384
MAX_HEADER_LIST = 1 << 16  # what the proxy advertises (h2's default) and enforces
CONTINUATION_BACKLOG = 64  # CONTINUATION frames one header block may take (h2's limit)
RECENTLY_RESET_MAX = 1024  # reset stream ids remembered: frames the peer sent before it knew are dropped quietly

_HEAD = struct.Struct(">IBI")  # 24-bit length and type in the first word, flags, stream id
_U32 = struct.Struct(">I")
_U16U32 = struct.Struct(">HI")
_SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


class ProtocolError(h2.exceptions.ProtocolError):
    """A connection error: the GOAWAY is prepared (data_to_send) and the codec accepts nothing more."""

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


StreamClosedError = h2.exceptions.StreamClosedError


def _frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload) << 8 | kind, flags, sid) + payload


class _Stream:
    """One stream's flow-control windows and half-closed states."""

    __slots__ = ("head_done", "local_ended", "recv_window", "remote_ended", "send_window", "unacked")

    def __init__(self, send_window: int, recv_window: int, head_done: bool) -> None:
        self.head_done = head_done  # the request's (server side) or final response's (client side) head came
        self.send_window = send_window  # what we may still send (the peer's window)
        self.recv_window = recv_window  # what the peer may still send us
        self.unacked = 0  # received, acknowledged by the proxy, not yet credited back (WINDOW_UPDATE)
        self.remote_ended = False
        self.local_ended = False


class H2Codec:
    """One h2c connection (prior knowledge). Server side: the client's preface is expected first, the client opens
    the streams. Client side: our preface goes first, send_headers on get_next_available_stream_id() opens one."""

    client_side = False

    def __init__(self, max_streams: int, enforced_streams: int, window: int, connection_window: int) -> None:
        self.next_stream_id = 1  # client side: the stream send_headers may open next
        self.peer_max_concurrent_streams = 100  # the peer's SETTINGS_MAX_CONCURRENT_STREAMS (assumed until told)
        self.max_streams = max_streams  # advertised
        self.enforced_streams = enforced_streams  # past this many open at once: PROTOCOL_ERROR
        self.local_window = window  # our SETTINGS_INITIAL_WINDOW_SIZE
        self.encoder = Encoder()
        self.decoder = MemoDecoder(MAX_HEADER_LIST)
        self.streams: dict[int, _Stream] = {}
        self.highest_inbound_stream_id = 0
        self.max_outbound_frame_size = DEFAULT_FRAME_SIZE
        self.peer_initial_window = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW  # connection level, ours to use
        self.recv_window = connection_window  # connection level, the peer's
        self.connection_window = connection_window
        self.recv_unacked = 0
        self.out: list[bytes] = []
        self.buf = b""
        self.preface = self.client_side  # the client's preface has been read (a client expects none)
        self.settings_seen = False
        self.closed = False
        self.headers_sid = 0  # a header block in progress (CONTINUATION expected)
        self.headers_flags = 0
        self.headers_parts: list[bytes] = []
        self.headers_frames = 0
        self.recently_reset: dict[int, None] = {}  # streams reset either way (frames in flight may still come)

    # ---- set-up and output --------------------------------------------------------------------------

    def initiate_connection(self) -> None:
        """(A client's preface,) our SETTINGS, and the connection window beyond RFC 9113's initial 65,535 bytes."""
        payload = struct.pack(
            ">HIHIHI",
            SETTING_MAX_CONCURRENT_STREAMS, self.max_streams,
            SETTING_INITIAL_WINDOW_SIZE, self.local_window,
            SETTING_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST,
        )  # fmt: skip
        if self.client_side:
            self.out.append(PREFACE)
            payload += _U16U32.pack(SETTING_ENABLE_PUSH, 0)
        self.out.append(_frame(SETTINGS, 0, 0, payload))
        if self.connection_window > DEFAULT_WINDOW:
            self.out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.connection_window - DEFAULT_WINDOW)))

    def data_to_send(self) -> bytes:
        out = self.out
        if not out:
            return b""
        data = b"".join(out) if len(out) > 1 else out[0]
        out.clear()
        return data

    # ---- input ----------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list:
        """Events for the frames `data` completes. Raises ProtocolError (GOAWAY prepared) on a connection error."""
        if self.closed:
            return []
        buf = self.buf + data if self.buf else data
        pos = 0
        events: list = []
        if not self.preface:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(buf):
                    self._fail("invalid connection preface", PROTOCOL_ERROR)
                self.buf = buf
                return events
            if not buf.startswith(PREFACE):
                self._fail("invalid connection preface", PROTOCOL_ERROR)
            pos = len(PREFACE)
            self.preface = True
        end = len(buf)
        try:
            while end - pos >= 9:
                word, flags, sid = _HEAD.unpack_from(buf, pos)
                length = word >> 8
                if length > DEFAULT_FRAME_SIZE:  # we never advertise a larger SETTINGS_MAX_FRAME_SIZE
                    self._fail("frame too large", FRAME_SIZE_ERROR)
                if end - pos - 9 < length:
                    break
                kind = word & 0xFF
                sid &= MAX_WINDOW
                payload = buf[pos + 9 : pos + 9 + length]
                pos += 9 + length
                if kind > HEADERS or self.headers_sid or not self.settings_seen:
                    self._receive_frame(kind, flags, sid, payload, events)
                elif kind:  # HEADERS and DATA, most frames, without the general dispatch
                    self._headers(flags, sid, payload, events)
                else:
                    self._data(flags, sid, payload, events)
        except ProtocolError:
            self.buf = b""
            raise
        self.buf = buf[pos:] if pos < end else b""
        return events

    def _fail(self, message: str, code: int) -> None:
        self.close_connection(code)
        raise ProtocolError(message, code)

    def _receive_frame(self, kind: int, flags: int, sid: int, payload: bytes, events: list) -> None:
        if not self.settings_seen:
            if kind != SETTINGS or flags & ACK:
                self._fail("the peer's first frame must be SETTINGS", PROTOCOL_ERROR)
            self.settings_seen = True
        if self.headers_sid and kind != CONTINUATION:
            self._fail("a header block was interrupted", PROTOCOL_ERROR)
        if kind == HEADERS:
            self._headers(flags, sid, payload, events)
        elif kind == DATA:
            self._data(flags, sid, payload, events)
        elif kind == WINDOW_UPDATE:
            self._window_update(sid, payload, events)
        elif kind == CONTINUATION:
            self._continuation(flags, sid, payload, events)
        elif kind == RST_STREAM:
            self._rst_stream(sid, payload, events)
        elif kind == SETTINGS:
            self._settings(flags, sid, payload, events)
        elif kind == PING:
            if len(payload) != 8:
                self._fail("PING of a length other than 8", FRAME_SIZE_ERROR)
            if sid:
                self._fail("PING on a stream", PROTOCOL_ERROR)
            if flags & ACK:
                events.append(ev.PingAckReceived(ping_data=payload))
            else:
                self.out.append(_frame(PING, ACK, 0, payload))
                events.append(ev.PingReceived(ping_data=payload))
        elif kind == PRIORITY:
            if len(payload) != 5:
                self._fail("PRIORITY of a length other than 5", FRAME_SIZE_ERROR)
            if not sid:
                self._fail("PRIORITY on stream 0", PROTOCOL_ERROR)
            event = ev.PriorityUpdated()
            event.stream_id = sid
            events.append(event)
        elif kind == GOAWAY:
            if sid:
                self._fail("GOAWAY on a stream", PROTOCOL_ERROR)
            if len(payload) < 8:
                self._fail("GOAWAY shorter than 8 bytes", FRAME_SIZE_ERROR)
            event = ev.ConnectionTerminated()
            event.last_stream_id = _U32.unpack_from(payload)[0] & MAX_WINDOW
            event.error_code = _U32.unpack_from(payload, 4)[0]
            event.additional_data = payload[8:]
            events.append(event)
        elif kind == PUSH_PROMISE:
            self._fail("PUSH_PROMISE (never enabled)", PROTOCOL_ERROR)
        else:  # unknown types (and ALTSVC, PRIORITY_UPDATE) are ignored, as RFC 9113 4.1 requires; reported
            events.append(ev.UnknownFrameReceived(frame=None))  # type: ignore[arg-type]

    def _unpad(self, flags: int, payload: bytes) -> bytes:
        """The frame's content without its padding; malformed padding fails the connection."""
        if flags & PADDED:
            if not payload:
                self._fail("PADDED frame without a pad length", PROTOCOL_ERROR)
            pad = payload[0]
            if pad >= len(payload):
                self._fail("padding longer than the frame", PROTOCOL_ERROR)
            return payload[1 : len(payload) - pad]
        return payload

    def _headers(self, flags: int, sid: int, payload: bytes, events: list) -> None:
        if not sid:
            self._fail("HEADERS on stream 0", PROTOCOL_ERROR)
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                self._fail("HEADERS too short for its priority fields", FRAME_SIZE_ERROR)
            block = block[5:]
        if flags & END_HEADERS:
            self._header_block(flags, sid, block, events)
        else:
            self.headers_sid, self.headers_flags, self.headers_parts, self.headers_frames = sid, flags, [block], 0

    def _continuation(self, flags: int, sid: int, payload: bytes, events: list) -> None:
        if not self.headers_sid or sid != self.headers_sid:
            self._fail("CONTINUATION without a header block in progress", PROTOCOL_ERROR)
        self.headers_frames += 1
        parts = self.headers_parts
        parts.append(payload)
        if self.headers_frames > CONTINUATION_BACKLOG:
            self._fail("too many CONTINUATION frames", ENHANCE_YOUR_CALM)
        if sum(map(len, parts)) > MAX_HEADER_LIST * 2:  # far past what the decoder would accept
            self._fail("header block too large", ENHANCE_YOUR_CALM)
        if flags & END_HEADERS:
            self.headers_sid = 0
            self.headers_parts = []
            self._header_block(self.headers_flags, sid, b"".join(parts), events)

    def _header_block(self, flags: int, sid: int, block: bytes, events: list) -> None:
        try:
            headers = self.decoder.decode(block, raw=True)
        except OversizedHeaderListError:
            self._fail("header list too large", ENHANCE_YOUR_CALM)
        except (HPACKError, IndexError, TypeError, ValueError):
            self._fail("undecodable header block", COMPRESSION_ERROR)
        ended = flags & END_STREAM
        stream = self.streams.get(sid)
        if stream is None:
            if self.client_side:
                if self._idle(sid):
                    self._fail("HEADERS on a stream the client did not open", PROTOCOL_ERROR)
                return  # closed (reset by us, frames in flight): dropped
            if sid <= self.highest_inbound_stream_id:
                if sid in self.recently_reset:
                    return  # in flight when the stream was reset: dropped
                # closed after both ends ended, or an idle one a higher stream closed (RFC 9113 5.1, 5.1.1)
                self._fail("HEADERS on a closed stream", STREAM_CLOSED)
            if not sid & 1:
                self._fail("client stream with an even id", PROTOCOL_ERROR)
            if len(self.streams) >= self.enforced_streams:
                self._fail("too many concurrent streams", PROTOCOL_ERROR)
            self.highest_inbound_stream_id = sid
            stream = self.streams[sid] = _Stream(self.peer_initial_window, self.local_window, True)
            event = ev.RequestReceived(stream_id=sid, headers=headers)
            events.append(event)
        elif stream.remote_ended:
            return self._stream_error(sid, STREAM_CLOSED, events)
        elif not stream.head_done:  # client side: a response head
            if headers and headers[0][0] == b":status" and headers[0][1][:1] == b"1":
                if ended:
                    self._fail("an interim response ending the stream", PROTOCOL_ERROR)
                events.append(ev.InformationalResponseReceived(stream_id=sid, headers=headers))
                return
            stream.head_done = True
            event = ev.ResponseReceived(stream_id=sid, headers=headers)
            events.append(event)
        else:  # trailers
            if not ended:
                self._fail("trailers without END_STREAM", PROTOCOL_ERROR)
            event = ev.TrailersReceived(stream_id=sid, headers=headers)
            events.append(event)
        if ended:
            event.stream_ended = self._remote_end(sid, stream, events)

    def _idle(self, sid: int) -> bool:
        """No frame but HEADERS (from the side that opens it) may name an idle stream. Only clients open streams
        here (odd ids): the server never does, push is never enabled."""
        if not sid & 1:
            return True
        return sid >= self.next_stream_id if self.client_side else sid > self.highest_inbound_stream_id

    def _remote_end(self, sid: int, stream: _Stream, events: list) -> ev.StreamEnded:
        stream.remote_ended = True
        ended = ev.StreamEnded(stream_id=sid)
        events.append(ended)
        if stream.local_ended:
            del self.streams[sid]
        return ended

    def _forget(self, sid: int) -> _Stream | None:
        """A stream reset (either way): gone, but remembered for a while (frames in flight)."""
        recent = self.recently_reset
        if len(recent) >= RECENTLY_RESET_MAX:
            del recent[next(iter(recent))]
        recent[sid] = None
        return self.streams.pop(sid, None)

    def _stream_error(self, sid: int, code: int, events: list) -> None:
        """RST_STREAM for the client's error on one stream, reported as a reset not sent by the client."""
        self._forget(sid)
        self.out.append(_frame(RST_STREAM, 0, sid, _U32.pack(code)))
        events.append(ev.StreamReset(stream_id=sid, error_code=code, remote_reset=False))

    def _data(self, flags: int, sid: int, payload: bytes, events: list) -> None:
        if not sid:
            self._fail("DATA on stream 0", PROTOCOL_ERROR)
        flow_len = len(payload)
        self.recv_window -= flow_len
        if self.recv_window < 0:
            self._fail("DATA beyond the connection window", FLOW_CONTROL_ERROR)
        data = self._unpad(flags, payload)
        stream = self.streams.get(sid)
        if stream is None or stream.remote_ended:
            if self._idle(sid):
                self._fail("DATA on an idle stream", PROTOCOL_ERROR)
            if stream is not None:  # the peer had ended it
                self._credit_connection(flow_len)
                return self._stream_error(sid, STREAM_CLOSED, events)
            # closed (a reset in flight, most likely): reported all the same, so that the guard counts empty
            # frames; nobody takes the data, and acknowledging it credits the connection (H2Side does)
            events.append(ev.DataReceived(stream_id=sid, data=data, flow_controlled_length=flow_len))
            return
        stream.recv_window -= flow_len
        if stream.recv_window < 0:
            self._fail("DATA beyond the stream window", FLOW_CONTROL_ERROR)
        event = ev.DataReceived(stream_id=sid, data=data, flow_controlled_length=flow_len)
        events.append(event)
        if flags & END_STREAM:
            event.stream_ended = self._remote_end(sid, stream, events)

    def _window_update(self, sid: int, payload: bytes, events: list) -> None:
        if len(payload) != 4:
            self._fail("WINDOW_UPDATE of a length other than 4", FRAME_SIZE_ERROR)
        delta = _U32.unpack(payload)[0] & MAX_WINDOW
        if not sid:
            if not delta:
                self._fail("WINDOW_UPDATE of 0 on the connection", PROTOCOL_ERROR)
            self.send_window += delta
            if self.send_window > MAX_WINDOW:
                self._fail("connection window past 2^31-1", FLOW_CONTROL_ERROR)
        else:
            stream = self.streams.get(sid)
            if stream is None:
                if self._idle(sid):
                    self._fail("WINDOW_UPDATE on an idle stream", PROTOCOL_ERROR)
                events.append(ev.WindowUpdated(stream_id=sid, delta=delta))  # counted by the guard all the same
                return  # closed: frames in flight
            if not delta:
                return self._stream_error(sid, PROTOCOL_ERROR, events)
            stream.send_window += delta
            if stream.send_window > MAX_WINDOW:
                return self._stream_error(sid, FLOW_CONTROL_ERROR, events)
        events.append(ev.WindowUpdated(stream_id=sid, delta=delta))

    def _rst_stream(self, sid: int, payload: bytes, events: list) -> None:
        if len(payload) != 4:
            self._fail("RST_STREAM of a length other than 4", FRAME_SIZE_ERROR)
        if not sid:
            self._fail("RST_STREAM on stream 0", PROTOCOL_ERROR)
        if self._idle(sid):
            self._fail("RST_STREAM on an idle stream", PROTOCOL_ERROR)
        if self._forget(sid) is None:
            return  # closed already
        events.append(ev.StreamReset(stream_id=sid, error_code=_U32.unpack(payload)[0], remote_reset=True))

    def _settings(self, flags: int, sid: int, payload: bytes, events: list) -> None:
        if sid:
            self._fail("SETTINGS on a stream", PROTOCOL_ERROR)
        if flags & ACK:
            if payload:
                self._fail("SETTINGS ACK with a payload", FRAME_SIZE_ERROR)
            events.append(ev.SettingsAcknowledged())
            return
        if len(payload) % 6:
            self._fail("SETTINGS length not a multiple of 6", FRAME_SIZE_ERROR)
        changed = {}
        for pos in range(0, len(payload), 6):
            code, value = _U16U32.unpack_from(payload, pos)
            if code == SETTING_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    self._fail("SETTINGS_INITIAL_WINDOW_SIZE past 2^31-1", FLOW_CONTROL_ERROR)
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():  # RFC 9113 6.9.2: open windows move by the difference
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        self._fail("a stream window past 2^31-1", FLOW_CONTROL_ERROR)
            elif code == SETTING_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= (1 << 24) - 1:
                    self._fail("SETTINGS_MAX_FRAME_SIZE out of range", PROTOCOL_ERROR)
                self.max_outbound_frame_size = value
            elif code == SETTING_ENABLE_PUSH:
                if value > 1:
                    self._fail("SETTINGS_ENABLE_PUSH other than 0 or 1", PROTOCOL_ERROR)
            elif code == SETTING_HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            elif code == SETTING_MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent_streams = value
            changed[code] = value
        self.out.append(_SETTINGS_ACK)
        event = ev.RemoteSettingsChanged()
        event.changed_settings = changed
        events.append(event)

    # ---- receive flow control ---------------------------------------------------------------------------

    def acknowledge_received_data(self, n: int, sid: int) -> None:
        """The proxy took n bytes of stream `sid` (forwarded them): credit them back, in batches of half a
        window, to the stream (while the client may still send on it) and to the connection."""
        stream = self.streams.get(sid)
        if stream is not None and not stream.remote_ended:
            stream.unacked += n
            if stream.unacked >= self.local_window >> 1 or stream.recv_window <= 0:
                self.out.append(_frame(WINDOW_UPDATE, 0, sid, _U32.pack(stream.unacked)))
                stream.recv_window += stream.unacked
                stream.unacked = 0
        self.recv_unacked += n
        if self.recv_unacked >= self.connection_window >> 1 or self.recv_window <= 0:
            self._credit_connection(0)

    def _credit_connection(self, n: int) -> None:
        self.recv_unacked += n
        unacked = self.recv_unacked
        if unacked and (unacked >= self.connection_window >> 1 or self.recv_window <= 0):
            self.out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(unacked)))
            self.recv_window += unacked
            self.recv_unacked = 0

    def increment_flow_control_window(self, n: int, stream_id: int | None = None) -> None:
        """Credit n more bytes to the connection (the stream is gone: only the connection's window matters)."""
        self._credit_connection(n)

    # ---- output -------------------------------------------------------------------------------------------

    def _sendable(self, sid: int) -> _Stream:
        if self.closed:
            raise ProtocolError("the connection is closed", PROTOCOL_ERROR)
        stream = self.streams.get(sid)
        if stream is None or stream.local_ended:
            raise StreamClosedError(sid)
        return stream

    def local_flow_control_window(self, sid: int) -> int:
        """What may be sent on stream `sid` now (the smaller of its window and the connection's)."""
        stream = self.streams.get(sid)
        if stream is None or stream.local_ended or self.closed:
            self._sendable(sid)  # raises
        window, connection = stream.send_window, self.send_window  # type: ignore[union-attr]
        return window if window < connection else connection

    def get_next_available_stream_id(self) -> int:
        return self.next_stream_id

    def send_headers(self, sid: int, headers, end_stream: bool = False) -> None:
        if self.client_side and sid >= self.next_stream_id and not self.closed:  # opens a stream
            if sid != self.next_stream_id:
                raise ProtocolError(f"stream {sid} opened out of order", PROTOCOL_ERROR)
            self.next_stream_id = sid + 2
            self.streams[sid] = _Stream(self.peer_initial_window, self.local_window, False)
        stream = self.streams.get(sid)
        if stream is None or stream.local_ended or self.closed:
            self._sendable(sid)  # raises
        block = self.encoder.encode(headers)
        size = self.max_outbound_frame_size
        flags = END_STREAM if end_stream else 0
        if len(block) <= size:
            self.out.append(_HEAD.pack(len(block) << 8 | HEADERS, flags | END_HEADERS, sid) + block)
        else:
            pieces = [block[i : i + size] for i in range(0, len(block), size)]
            self.out.append(_frame(HEADERS, flags, sid, pieces[0]))
            for piece in pieces[1:-1]:
                self.out.append(_frame(CONTINUATION, 0, sid, piece))
            self.out.append(_frame(CONTINUATION, END_HEADERS, sid, pieces[-1]))
        if end_stream:
            self._local_end(sid, stream)  # type: ignore[arg-type]

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.local_ended or self.closed:
            self._sendable(sid)  # raises
        n = len(data)
        if n > stream.send_window or n > self.send_window or n > self.max_outbound_frame_size:  # type: ignore[union-attr]
            raise ProtocolError("DATA beyond the peer's window or frame size", FLOW_CONTROL_ERROR)
        stream.send_window -= n  # type: ignore[union-attr]
        self.send_window -= n
        out = self.out
        out.append(_HEAD.pack(n << 8 | DATA, END_STREAM if end_stream else 0, sid))
        out.append(data)  # not copied into the frame: data_to_send joins them all once
        if end_stream:
            self._local_end(sid, stream)  # type: ignore[arg-type]

    def _local_end(self, sid: int, stream: _Stream) -> None:
        stream.local_ended = True
        if stream.remote_ended:
            del self.streams[sid]

    def reset_stream(self, sid: int, error_code: int = 8) -> None:
        if self.closed:
            raise ProtocolError("the connection is closed", PROTOCOL_ERROR)
        if self._forget(sid) is None:
            raise StreamClosedError(sid)
        self.out.append(_frame(RST_STREAM, 0, sid, _U32.pack(error_code)))

    def close_connection(self, error_code: int = NO_ERROR, additional_data: bytes | None = None,
                         last_stream_id: int | None = None) -> None:  # fmt: skip
        """GOAWAY; the codec takes and sends nothing more."""
        if self.closed:
            raise ProtocolError("the connection is closed", PROTOCOL_ERROR)
        if last_stream_id is None:  # the last stream the peer opened that we may process (none, client side)
            last_stream_id = 0 if self.client_side else self.highest_inbound_stream_id
        last = last_stream_id
        payload = struct.pack(">II", last & MAX_WINDOW, error_code) + (additional_data or b"")
        self.out.append(_frame(GOAWAY, 0, 0, payload))
        self.closed = True


class H2ServerCodec(H2Codec):
    """The server side: a client's connection."""


class H2ClientCodec(H2Codec):
    """The client side: an h2c upstream."""

    client_side = True
