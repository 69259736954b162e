"""HTTP/2 (h2c prior knowledge) connections, either side: the h2 codec the downstream (h2_downstream.py) and
upstream (h2_upstream.py) connections build on. Request streams are h2_stream.Bridge (the pipeline's h2 driver).

Flow control is end to end: DATA received on one side is acknowledged (WINDOW_UPDATE) only once it has been
handed to the other side's connection within that side's window, so a slow reader slows the writer.
Errors the proxy generates for `content-type: application/grpc` requests are gRPC statuses (trailers-only).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Protocol

import h2.errors
import h2.events
import h2.exceptions

from planemesh.agent.proxy.h2_codec import H2ClientCodec, H2Codec

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import Proxy as PlaneProxy

class Stream(Protocol):
    """What an h2 connection calls on the request stream (h2_stream.Bridge) its frames belong to."""

    def on_data(self, side: H2Side, data: bytes, flow_len: int) -> None: ...
    def on_end(self, side: H2Side) -> None: ...
    def on_trailers(self, side: H2Side, trailers: list[tuple[bytes, bytes]]) -> None: ...
    def on_reset(self, side: H2Side, code: int) -> None: ...


# HTTP status -> gRPC status for proxy-generated errors (as Envoy's grpc_http1_bridge / router do).
GRPC_STATUS = {400: 13, 404: 12, 429: 14, 502: 14, 503: 14, 504: 4}

WINDOW = 1 << 20
MAX_STREAMS = 1000  # advertised to upstream servers (they open no streams to us)


class H2Side(asyncio.Protocol):
    """One h2 connection (either direction) with per-stream send queues that respect the peer's windows and
    the transport's buffer.

    What h2 has to send is written once per event-loop pass (flush() schedules the write): every stream
    answered in one pass shares one send().
    """

    client_side = False

    def __init__(self, proxy: PlaneProxy) -> None:
        self.proxy = proxy
        self.conn = self._new_conn()
        self.transport: asyncio.Transport | None = None
        self.bridges: dict[int, Stream] = {}
        self.queues: dict[int, deque[list]] = {}  # stream -> [[data, end, on_sent], ...] waiting for window
        self.closed = False
        self.write_scheduled = False
        self.write_paused = False  # the transport's buffer is full: DATA waits (and so does the other side)
        self.data_frames = 0  # DATA frames sent (the WINDOW_UPDATE allowance of a client grows with them)

    def _new_conn(self) -> H2Codec:
        """The codec (h2_codec.py): an h2c upstream's client side here; H2Downstream makes its server side."""
        return H2ClientCodec(MAX_STREAMS, MAX_STREAMS, WINDOW, WINDOW * 4 + 65535)

    def _init_conn(self) -> None:
        """Our preface and SETTINGS: a stream window of WINDOW, and a connection window that lets the peer have
        4 such windows in flight that the other side has not taken yet."""
        self.conn.initiate_connection()

    def flush(self) -> None:
        """Write what h2 prepared, at the end of this event-loop pass."""
        if not self.write_scheduled and self.transport is not None and not self.closed:
            self.write_scheduled = True
            self.proxy.loop.call_soon(self.write_now)

    def write_now(self) -> None:
        self.write_scheduled = False
        if self.transport is None or self.closed:
            return  # not connected yet: h2 keeps the bytes until connection_made flushes
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def pause_writing(self) -> None:
        """A peer with a large window that reads slowly: stop handing DATA to h2, so what waits stays in the
        stream queues, unacknowledged, and the other side's flow control stops its sender."""
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.pump()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.close()  # with the GOAWAY h2 prepared
            return
        bridges = self.bridges
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                bridge = bridges.get(event.stream_id)
                if bridge is None:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    bridge.on_data(self, event.data, event.flow_controlled_length)
            elif kind is h2.events.StreamEnded:
                bridge = bridges.get(event.stream_id)
                if bridge is not None:
                    bridge.on_end(self)
            elif kind is h2.events.TrailersReceived:
                bridge = bridges.get(event.stream_id)
                if bridge is not None:
                    bridge.on_trailers(self, event.headers)
            else:
                self.handle(event)
        if self.conn.out:  # WINDOW_UPDATEs, SETTINGS or PING acks, trailers... (often nothing: no write)
            self.flush()

    def handle(self, event: h2.events.Event) -> None:
        kind = type(event)
        if kind is h2.events.TrailersReceived:
            bridge = self.bridges.get(event.stream_id)
            if bridge is not None:
                bridge.on_trailers(self, event.headers)
        elif kind is h2.events.StreamReset:
            self.drop_queue(event.stream_id)
            bridge = self.bridges.get(event.stream_id)
            if bridge is not None:
                bridge.on_reset(self, event.error_code)
        elif kind is h2.events.WindowUpdated:
            if event.stream_id:  # one stream's window: only its queue (O(1) per frame, not per stream)
                queue = self.queues.get(event.stream_id)
                if queue is not None:
                    self._pump_stream(event.stream_id, queue)
                    if not queue:
                        del self.queues[event.stream_id]
                    self.flush()
            else:
                self.pump()
        elif kind is h2.events.RemoteSettingsChanged:
            self.pump()
        elif kind is h2.events.ConnectionTerminated:
            self.on_goaway(event.last_stream_id)

    def on_goaway(self, last_stream_id: int) -> None:
        """Streams above last_stream_id were not processed by the peer."""
        for sid, bridge in list(self.bridges.items()):
            if sid > last_stream_id:
                bridge.on_reset(self, h2.errors.ErrorCodes.REFUSED_STREAM)

    # ---- sending ------------------------------------------------------------------------------------

    def send(self, sid: int, data: bytes | list, end: bool, on_sent=None) -> None:
        """Queue DATA (bytes) or trailers (a list of fields, always ending the stream) for stream `sid`."""
        queue = self.queues.get(sid)
        if queue is not None:  # already waiting for window: keep the order
            queue.append([data, end, on_sent])
            return
        if type(data) is list:  # trailers, nothing waiting before them: no window needed
            try:
                self.conn.send_headers(sid, data, end_stream=True)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            self.flush()
            return
        if data and type(data) is bytes and not self.write_paused:  # the common case: it fits, one frame
            conn = self.conn
            try:
                fits = len(data) <= conn.local_flow_control_window(sid) and len(data) <= conn.max_outbound_frame_size
                if fits:
                    conn.send_data(sid, data, end_stream=end)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                fits = True  # the stream is gone: counted as sent, as _discard does
            if fits:
                self.data_frames += 1
                if on_sent is not None:
                    on_sent(len(data))
                self.flush()
                return
        queue = deque(([data, end, on_sent],))
        self._pump_stream(sid, queue)
        if queue:
            self.queues[sid] = queue
        self.flush()

    def pump(self) -> None:
        """The peer's windows grew: send what waited for them."""
        queues = self.queues
        for sid, queue in list(queues.items()):
            self._pump_stream(sid, queue)
            if not queue:
                del queues[sid]
        self.flush()

    def _pump_stream(self, sid: int, queue: deque[list]) -> None:
        conn = self.conn
        while queue:
            item = queue[0]
            data, end, on_sent = item
            if type(data) is list:  # trailers: no window needed
                try:
                    conn.send_headers(sid, data, end_stream=True)
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    pass
                queue.clear()
                return
            try:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError:
                _discard(queue)
                return
            if data and (window <= 0 or self.write_paused):
                return
            if len(data) > window:
                piece = data[:window]
                item[0] = data[window:]
                last = False
            else:
                piece = data
                last = True
            try:
                conn.send_data(sid, piece, end_stream=end and last)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                _discard(queue)
                return
            self.data_frames += 1
            if on_sent is not None and piece:
                on_sent(len(piece))
            if last:
                queue.popleft()

    def drop_queue(self, sid: int) -> None:
        """The stream is gone: what waited for its window is dropped, and counted as sent so that the other
        side's flow control and the response-buffer accounting get it back."""
        queue = self.queues.pop(sid, None)
        if queue:
            _discard(queue)

    def reset(self, sid: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        self.drop_queue(sid)
        self.bridges.pop(sid, None)
        try:
            self.conn.reset_stream(sid, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self.flush()

    def ack(self, sid: int, n: int) -> None:
        """The other side took n bytes of this stream: let our peer send more."""
        if n and not self.closed:
            conn = self.conn
            try:
                conn.acknowledge_received_data(n, sid)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                try:  # the stream is gone: credit the connection window only
                    conn.increment_flow_control_window(n)
                except h2.exceptions.ProtocolError:
                    return
            if conn.out:  # a WINDOW_UPDATE is due (credit goes in batches of half a window)
                self.flush()

    def close(self) -> None:
        if not self.closed:
            self.write_now()  # a GOAWAY h2 prepared goes out before the close
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for sid in list(self.queues):
            self.drop_queue(sid)
        for bridge in list(self.bridges.values()):
            bridge.on_reset(self, h2.errors.ErrorCodes.CANCEL)
        self.bridges.clear()


def _discard(queue: deque[list]) -> None:
    """Drop what waits in a stream's queue, counted as sent (its on_sent callbacks run)."""
    items = list(queue)
    queue.clear()
    for data, _, on_sent in items:
        if on_sent is not None and type(data) is not list and data:
            on_sent(len(data))
