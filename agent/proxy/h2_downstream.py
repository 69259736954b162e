"""A client's h2c connection (the HTTP/2 server side): each request stream becomes a Bridge (h2.py), and every
frame and stream is checked against the connection's abuse limits (h2_guard.py); past one, GOAWAY with
ENHANCE_YOUR_CALM and close. See docs/protocols.md, "Abuse limits of the HTTP/2 server side"."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import TYPE_CHECKING

import h2.errors
import h2.events
import h2.exceptions

from planemesh.agent.proxy.h2 import WINDOW, H2Side
from planemesh.agent.proxy.h2_codec import H2ServerCodec
from planemesh.agent.proxy.h2_guard import H2Guard, H2Limits
from planemesh.agent.proxy.h2_stream import Bridge

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import Proxy as PlaneProxy

ENHANCE_YOUR_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
ABUSE_LINGER_S = 1.0  # Envoy: delayed_close_timeout (1 s)
# What a closing connection still reads and drops: far more than a client's frames in flight (a flooding
# client that reads only once it stops sending still gets its GOAWAY, not a reset), after which it is no longer
# read (TCP flow control stops it) instead of costing a CPU for the whole linger (measured: 26M frames, ~230 MB,
# read and dropped in 1 s while the other plane's p99 grew 4x).
LINGER_DROP_BYTES = 16 << 20
# A refused connection's GOAWAY code, by PlaneProxy.admit's reason: the client's own address holding its share is
# its excess (ENHANCE_YOUR_CALM); a full plane or a worker short of memory is not its fault, and no stream was
# processed (last stream id 0), so it may retry elsewhere or later (REFUSED_STREAM, as for a refused stream).
REFUSAL_CODES = {"source-connections": ENHANCE_YOUR_CALM}
MAX_STREAM_ID = (1 << 31) - 1


def goaway_frame(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    """A GOAWAY written beside h2 (whose own GOAWAY closes its state machine, and with it the streams in progress
    that RFC 9113 6.8 lets complete)."""
    payload = struct.pack(">II", last_stream_id & MAX_STREAM_ID, code) + debug
    return struct.pack(">I", len(payload))[1:] + b"\x07\x00\x00\x00\x00\x00" + payload


class H2Downstream(H2Side):
    """A client's h2c connection: each request stream becomes a Bridge. Like every client connection it is
    admitted, swept while idle and reset under memory pressure by the plane (limits.ClientConnection)."""

    client_side = False
    conn: H2ServerCodec  # type: ignore[assignment]
    in_headers = False  # h2 hands a header block over whole (its CONTINUATION backlog is h2's own limit)

    def __init__(self, proxy: PlaneProxy, preread: bytes = b"") -> None:
        super().__init__(proxy)
        self.preread = preread  # bytes an HTTP/1 Downstream read before seeing the preface
        self.local: tuple[str, int] = ("", 0)
        self.peer_ip_b = b""
        self.linger_dropped = 0  # bytes read and dropped while closing after a GOAWAY
        self.table = None  # the routing table route_config was looked up in
        self.route_config = None
        self.guard = H2Guard(H2Limits.from_sla(proxy.sla), time.perf_counter)
        self.paused_up: dict = {}  # response writers whose upstream waits for the connection's buffer budget
        self.resets: set[int] | frozenset[int] = frozenset()  # streams reset in the batch being handled
        self.peer_ip = ""
        self.last_active = 0.0  # accepted, or a stream last opened or finished (PINGs do not keep it alive)
        self.goaway_sid: int | None = None  # after a graceful GOAWAY: the last stream it lets in

    def _new_conn(self) -> H2ServerCodec:  # type: ignore[override]
        limits = H2Limits.from_sla(self.proxy.sla)
        streams, budget = limits.max_concurrent_streams, limits.buffer_limit_bytes
        # Streams past the limit get REFUSED_STREAM from handle(); the codec ends the connection only far beyond
        # it (a client ignoring the setting, or keeping answered streams half open). Request bytes not yet
        # forwarded stay within the buffer budget: the connection window is the budget, and it is credited only
        # as bytes go upstream.
        return H2ServerCodec(streams, streams * 2 + 16, min(WINDOW, budget), max(budget, 65535))

    @property
    def active(self) -> dict[int, Bridge] | None:
        """The streams in progress (None: idle), for the plane's idle sweep and drain."""
        return self.bridges or None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        proxy = self.proxy
        proxy.stats.downstream_active += 1
        proxy.stats.downstream_total += 1
        proxy.connections.add(self)
        self.last_active = proxy.loop.time()
        sockname = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        self.local = proxy.original_destination(sockname, peer)
        self.peer_ip = peer[0].removeprefix("::ffff:") if peer else ""
        self.peer_ip_b = self.peer_ip.encode()
        self.conn.initiate_connection()
        refusal = proxy.admit(self)  # plane total, per-source share, memory overload: as for HTTP/1.1
        if refusal is not None:
            self.refuse(refusal)
            return
        self.flush()
        if self.preread:
            data, self.preread = self.preread, b""
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        proxy = self.proxy
        proxy.stats.downstream_active -= 1
        proxy.connections.discard(self)
        proxy.release(self)
        self.paused_up.clear()
        super().connection_lost(exc)

    # ---- the plane's admission, idle sweep and overload manager (limits.ClientConnection) ---------------

    def refuse(self, why: str) -> None:
        """Not admitted: the server preface, then GOAWAY(last stream 0: nothing processed, safe to retry) naming
        why (the x-planemesh-overloaded value of HTTP/1.1's 503), then the delayed close. The client spoke h2
        first (its preface is what made this an H2Downstream), so an HTTP/1.1 503 would not parse."""
        try:
            self.conn.close_connection(REFUSAL_CODES.get(why, REFUSED_STREAM), why.encode(), last_stream_id=0)
        except h2.exceptions.ProtocolError:
            pass
        self.close_after_goaway()

    def headers_overdue(self, now: float, timeout_s: float) -> bool:
        return False  # never in_headers

    def close(self) -> None:
        """Idle timeout, drain: GOAWAY(NO_ERROR), then the delayed close (Envoy does the same on idle_timeout).
        Called again while that delay runs (drain's end), the connection is closed at once."""
        if self.closed:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()
            return
        try:
            self.conn.close_connection(NO_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        self.close_after_goaway()

    def stop_keep_alive(self) -> None:
        """The worker sheds load: a graceful GOAWAY (last stream: the highest opened so far); the streams in
        progress complete, later ones are refused, and the connection closes once idle. Once per connection."""
        if self.goaway_sid is not None or self.closed or self.transport is None:
            return
        self.goaway_sid = self.conn.highest_inbound_stream_id
        self.write_now()  # what h2 prepared goes first
        self.transport.write(goaway_frame(self.goaway_sid, NO_ERROR, b"overloaded"))

    def buffered_bytes(self) -> int:
        """Bytes this connection holds (overload.BufferHolder): response bytes queued per stream for the client's
        window, what the transport has not sent yet, and what the upstreams of its streams hold for them (h2's
        own output is written every event-loop pass: not counted)."""
        n = 0
        for queue in self.queues.values():
            n += sum(len(item[0]) for item in queue if type(item[0]) is not list)
        if self.transport is not None and not self.closed:
            n += self.transport.get_write_buffer_size()
        for bridge in self.bridges.values():
            n += bridge.upstream_buffered()
        return n

    def abort(self) -> None:
        """Reset now (overload.BufferHolder): the worker is past its hard memory threshold."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:  # RST, not FIN: the kernel drops the send queue too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    # ---- back-pressure: a client that does not read is not read either -------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.transport is not None:
            self.transport.pause_reading()  # no more requests, PINGs or SETTINGS to answer meanwhile

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        super().resume_writing()

    def write_now(self) -> None:
        super().write_now()
        guard = self.guard
        if guard.control_queued and self.transport is not None and not self.transport.get_write_buffer_size():
            guard.write_drained()

    # ---- inbound frames, checked against the guard's limits ----------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:  # closing after a GOAWAY: dropped, up to LINGER_DROP_BYTES
            self.linger_dropped += len(data)
            if self.linger_dropped > LINGER_DROP_BYTES and self.transport is not None:
                self.transport.pause_reading()
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.close_after_goaway()  # the one h2 prepared
            return
        # A stream opened and reset in the same batch (rapid reset) never reaches an upstream.
        resets = {e.stream_id for e in events if type(e) is h2.events.StreamReset}
        self.resets = resets or frozenset()
        bridges = self.bridges
        guard = self.guard
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                if not event.flow_controlled_length and event.stream_ended is None:
                    reason = guard.payload_frame(True)
                    if reason is not None:
                        return self.abuse(reason)
                elif guard.empty_run:
                    guard.empty_run = 0
                bridge = bridges.get(event.stream_id)
                if bridge is None:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    bridge.on_data(self, event.data, event.flow_controlled_length)
            elif kind is h2.events.StreamEnded:
                bridge = bridges.get(event.stream_id)
                if bridge is not None:
                    bridge.on_end(self)
            else:
                self.handle(event)
            if self.closed:
                return
        self.resets = frozenset()
        self.flush()

    def handle(self, event: h2.events.Event) -> None:
        kind = type(event)
        guard = self.guard
        reason = None
        if kind is h2.events.RequestReceived:
            reason = guard.payload_frame(not event.headers and event.stream_ended is None)
            if reason is None:
                reason = self.open_stream(event)
        elif kind is h2.events.WindowUpdated:
            reason = guard.window_update_frame(self.data_frames)
        elif kind is h2.events.PingReceived or kind is h2.events.RemoteSettingsChanged:
            transport = self.transport
            reason = guard.control_frame(transport is not None and transport.get_write_buffer_size() > 0)
        elif kind is h2.events.PriorityUpdated:
            reason = guard.priority_frame()
        elif kind is h2.events.TrailersReceived:
            guard.empty_run = 0
        elif kind is h2.events.UnknownFrameReceived:
            reason = guard.control_frame(False)
        elif kind is h2.events.ConnectionTerminated:
            return self.client_goaway(event.error_code)
        elif kind is h2.events.StreamReset and not event.remote_reset:
            # MadeYouReset (CVE-2025-8671): h2 reset the stream for the client's protocol error (DATA after
            # END_STREAM, a stream WINDOW_UPDATE overflowing). Handled as the client's own reset, as Envoy does:
            # the Bridge cancels its upstream and the guard counts it as premature (stream_done).
            self.proxy.stats.h2_provoked_resets += 1
        if reason is not None:
            return self.abuse(reason)
        if kind is not h2.events.RequestReceived:
            super().handle(event)

    def client_goaway(self, code: int) -> None:
        """The client's GOAWAY. NO_ERROR: it opens no more streams and those in progress complete (RFC 9113 6.8),
        then the connection closes (as after the proxy's own graceful GOAWAY). Another code: the client gives up
        on the connection, its streams are cancelled."""
        if code != NO_ERROR:
            return self.on_goaway(0)
        if self.goaway_sid is None:
            self.goaway_sid = self.conn.highest_inbound_stream_id
        if not self.bridges:
            self.proxy.loop.call_soon(self.close)

    def open_stream(self, event: h2.events.RequestReceived) -> str | None:
        sid = event.stream_id
        guard = self.guard
        self.last_active = self.proxy.loop.time()
        if sid in self.resets:  # reset before anything was done for it: a premature reset at once
            guard.stream_opened()
            self.proxy.stats.h2_premature_resets += 1
            return guard.stream_closed(guard.clock(), False, True)
        if not guard.may_open(len(self.bridges)) or (self.goaway_sid is not None and sid > self.goaway_sid):
            self.proxy.stats.h2_refused_streams += 1
            self.reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            transport = self.transport
            return guard.control_frame(transport is not None and transport.get_write_buffer_size() > 0)
        guard.stream_opened()
        bridge = Bridge(self, sid, event.headers)
        self.bridges[sid] = bridge
        bridge.start(event.stream_ended is not None)
        return None

    def stream_done(self, bridge: Bridge, reset_by_client: bool) -> None:
        if self.closed:
            return  # the connection went away: not the client's reset
        self.last_active = self.proxy.loop.time()
        if not self.bridges and not self.queues:
            self.guard.buffered = 0  # nothing is in flight: the budget's count is exact again, whatever drifted
            if self.goaway_sid is not None:  # shedding: the last stream let in has been answered
                self.proxy.loop.call_soon(self.close)
        if reset_by_client and not bridge.status:
            self.proxy.stats.h2_premature_resets += 1
        reason = self.guard.stream_closed(bridge.t0, bridge.status != 0, reset_by_client)
        if reason is not None:
            self.abuse(reason)

    def abuse(self, reason: str) -> None:
        """Past a limit: GOAWAY(ENHANCE_YOUR_CALM) naming the limit, the streams cancelled, then close."""
        if self.closed:
            return
        self.proxy.stats.h2_abuse_closed += 1
        try:
            self.conn.close_connection(ENHANCE_YOUR_CALM, additional_data=reason.encode())
        except h2.exceptions.ProtocolError:
            pass
        self.close_after_goaway()

    def close_after_goaway(self) -> None:
        """Like Envoy's delayed close: the write side is shut after the GOAWAY, what the client still sends is
        read and dropped for ABUSE_LINGER_S, so that the close is a FIN after the GOAWAY, not a reset (unread
        input) that could destroy the GOAWAY before the client read it."""
        if self.closed:
            return
        self.write_now()
        self.closed = True
        self.proxy.release(self)  # lingering, it blocks no one: out of the plane's budget and its source's share
        for bridge in list(self.bridges.values()):
            bridge.on_reset(self, h2.errors.ErrorCodes.CANCEL)
        self.bridges.clear()
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        self.proxy.loop.call_later(ABUSE_LINGER_S, transport.close)

    def respond(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        try:
            self.conn.send_headers(sid, headers, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.flush()
