"""HTTP/2 (h2c prior knowledge) and gRPC: downstream h2 connections, streams bridged to pooled upstream h2c
connections (clusters with http2=True) or to one HTTP/1.1 connection per stream (h2_upstream.py).

Flow control is end to end: DATA received on one side is acknowledged (WINDOW_UPDATE) only once it has been
handed to the other side's connection within that side's window, so a slow reader slows the writer.
Errors the proxy generates for `content-type: application/grpc` requests are gRPC statuses (trailers-only).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from planemesh.agent.proxy import accesslog
from planemesh.agent.proxy.authz import DENIED_BODY, rbac_denial
from planemesh.agent.proxy.balancer import normalise_ip
from planemesh.agent.proxy.h2_hpack import MemoDecoder, StatelessEncoder
from planemesh.agent.proxy.http1 import HOP_BY_HOP_H2, TRAILER_DROP
from planemesh.agent.proxy.limits import MEMORY_SHED_HEADERS
from planemesh.agent.proxy.request_head import header_map, new_request_id
from planemesh.agent.proxy.xfcc import XFCC
from planemesh.agent.proxy.xfcc import combined as xfcc_combined
from planemesh.agent.tls_config import any_tls

if TYPE_CHECKING:
    from planemesh.agent.proxy.h2_downstream import H2Downstream
    from planemesh.agent.proxy.server import PlaneProxy

# HTTP status -> gRPC status for proxy-generated errors (as Envoy's grpc_http1_bridge / router do).
GRPC_STATUS = {400: 13, 404: 12, 429: 14, 502: 14, 503: 14, 504: 4}
# Response fields from an h2 upstream that never reach the client: the connection-specific ones, and te.
_RESPONSE_DROP = HOP_BY_HOP_H2 | {b"te"}
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
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=self.client_side,
                header_encoding=None,
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
                # StatelessEncoder lower-cases names, trims values and never indexes credentials; the proxy
                # drops connection-specific fields itself.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.conn.encoder = StatelessEncoder()  # type: ignore[assignment]
        self.conn.decoder = MemoDecoder(self.conn.decoder.max_header_list_size)
        self.transport: asyncio.Transport | None = None
        self.bridges: dict[int, Bridge] = {}
        self.queues: dict[int, deque[list]] = {}  # stream -> [[data, end, on_sent], ...] waiting for window
        self.closed = False
        self.write_scheduled = False
        self.write_paused = False  # the transport's buffer is full: DATA waits (and so does the other side)
        self.data_frames = 0  # DATA frames sent (the WINDOW_UPDATE allowance of a client grows with them)

    def _init_conn(
        self,
        max_streams: int = MAX_STREAMS,
        enforced_streams: int = MAX_STREAMS,
        window: int = WINDOW,
        connection_window: int = WINDOW * 4 + 65535,
    ) -> None:
        """Advertise max_streams and a stream window; h2 itself ends the connection (PROTOCOL_ERROR) past
        enforced_streams. The peer may have connection_window bytes in flight that the other side has not taken."""
        self.conn.local_settings = self._settings(max_streams, window)
        self.conn.initiate_connection()
        if enforced_streams != max_streams:  # the SETTINGS frame is prepared: what h2 enforces may differ
            self.conn.local_settings = self._settings(enforced_streams, window)
        if connection_window > 65535:  # RFC 9113's initial connection window
            self.conn.increment_flow_control_window(connection_window - 65535)

    def _settings(self, max_streams: int, window: int) -> h2.settings.Settings:
        return h2.settings.Settings(
            client=self.client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            },
        )

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
            else:
                self.handle(event)
        self.flush()

    def handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.TrailersReceived):
            bridge = self.bridges.get(event.stream_id)
            if bridge is not None:
                bridge.on_trailers(self, event.headers)
        elif isinstance(event, h2.events.StreamReset):
            self.drop_queue(event.stream_id)
            bridge = self.bridges.get(event.stream_id)
            if bridge is not None:
                bridge.on_reset(self, event.error_code)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:  # one stream's window: only its queue (O(1) per frame, not per stream)
                queue = self.queues.get(event.stream_id)
                if queue is not None:
                    self._pump_stream(event.stream_id, queue)
                    if not queue:
                        del self.queues[event.stream_id]
                    self.flush()
            else:
                self.pump()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.pump()
        elif isinstance(event, h2.events.ConnectionTerminated):
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
            try:
                self.conn.acknowledge_received_data(n, sid)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                try:  # the stream is gone: credit the connection window only
                    self.conn.increment_flow_control_window(n)
                except h2.exceptions.ProtocolError:
                    return
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


class Bridge:
    """One request stream: downstream h2 stream <-> an upstream (h2 stream or HTTP/1.1 connection).

    It is also its own access-log record (formatted in batches later, like an Exchange)."""

    __slots__ = (
        "authority_b",
        "bytes_rx",
        "bytes_tx",
        "deadline",
        "done",
        "ds",
        "duration_ms",
        "fields",
        "flags",
        "grpc",
        "method_b",
        "path_b",
        "pseudo",
        "reopened",
        "req_ended",
        "rid",
        "sid",
        "start_time",
        "status",
        "t0",
        "try_deadline",
        "up",
        "up_sid",
        "upstream_host",
    )

    protocol = "HTTP/2"
    upstream_ms = None
    xff = None
    user_agent = None

    def __init__(self, ds: H2Downstream, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.ds = ds
        self.sid = sid
        # One pass over the request's fields: the pseudo-headers, gRPC or not, and what goes upstream (hop-by-hop
        # fields dropped, x-request-id kept or added, x-forwarded-for extended with the client's address).
        pseudo = []
        fields = []
        method = path = b""
        authority = None
        grpc = False
        rid = xff = None
        xfcc: list[bytes] = []
        for field in headers:
            n = field[0]
            if n[:1] == b":":
                pseudo.append(field)
                if n == b":method":
                    method = field[1]
                elif n == b":path":
                    path = field[1]
                elif n == b":authority":
                    authority = field[1]
            elif n in HOP_BY_HOP_H2:
                continue
            elif n == b"te":
                if field[1] == b"trailers":
                    fields.append(field)
            elif n == b"x-forwarded-for":
                xff = field[1]
            elif n == XFCC:
                xfcc.append(field[1])  # decided below: a client must not forge it (agent/proxy/xfcc.py)
            else:
                if n == b"content-type":
                    grpc = field[1].startswith(b"application/grpc")
                elif n == b"x-request-id":
                    rid = field[1]
                fields.append(field)
        if rid is None:
            rid = new_request_id()
            fields.append((b"x-request-id", rid))
        peer = ds.peer_ip_b
        fields.append((b"x-forwarded-for", xff + b", " + peer if xff else peer))
        if (client_cert := xfcc_combined(ds.transport, xfcc)) is not None:
            fields.append((XFCC, client_cert))
        self.pseudo = pseudo
        self.fields = fields
        self.method_b = method
        self.path_b = path
        self.authority_b = authority
        self.grpc = grpc
        self.rid = rid
        self.up = None  # H2Upstream or H1Stream
        self.up_sid = 0
        self.reopened = 0  # times refused by an h2 upstream (not processed) and opened again
        self.req_ended = False  # the client's end of the stream went upstream (with the headers, a DATA or trailers)
        self.status = 0
        self.done = False
        self.t0 = time.perf_counter()
        self.start_time = time.time()
        self.deadline = 0.0  # loop time; 0: none (checked by the proxy's deadline sweep)
        self.try_deadline = 0.0
        self.bytes_rx = 0
        self.bytes_tx = 0
        self.upstream_host: str | None = None
        self.flags = ""
        self.duration_ms = 0

    # ---- access-log view (decoded when the batch is formatted) -----------------------------------------

    @property
    def method(self) -> str:
        return self.method_b.decode("latin-1") or "-"

    @property
    def path(self) -> str:
        return self.path_b.decode("latin-1") or "-"

    @property
    def authority(self) -> str | None:
        return self.authority_b.decode("latin-1") if self.authority_b else None

    @property
    def request_id(self) -> str:
        return self.rid.decode("latin-1")

    @property
    def plane(self) -> str:
        return self.ds.proxy.plane_name

    # ---- request side -------------------------------------------------------------------------------

    def start(self, ended: bool) -> None:
        self.req_ended = ended
        ds = self.ds
        proxy = ds.proxy
        stats = proxy.stats
        stats.requests_total += 1
        stats.requests_active += 1
        overload = proxy.overload
        if not overload.keep_alive or proxy.draining:  # memory or connection pressure: as overload_gate for h1
            ds.stop_keep_alive()
            if overload.shedding:
                stats.shed_requests += 1
                return self.local_error(503, "overloaded", accesslog.OM, headers=MEMORY_SHED_HEADERS)
        if stats.requests_active > proxy.sla.max_requests:
            stats.overloaded += 1
            return self.local_error(503, "overloaded", accesslog.UO)
        if proxy.bucket is not None and not proxy.bucket.take():
            stats.rate_limited += 1
            return self.local_error(429, "local rate limited", accesslog.RL)
        table = proxy.table
        router = table.router
        if ds.table is not table:  # first stream of the connection, or a new snapshot since
            ds.table = table
            ds.route_config = router.route_config(ds.local[0], ds.local[1]) or router.original_destination
        authority = self.authority_b.decode("latin-1") if self.authority_b else ""
        crc = ds.route_config
        if crc is not None and crc.http_filters:  # RBAC applies to h2 clients too (agent/proxy/authz.py)
            rbac = crc.filter_chain(proxy.clock).rbac
            path = (self.path_b or b"/").decode("latin-1")
            if rbac and rbac_denial(proxy, rbac, self._header_map, self.method_b.decode("latin-1"), path, authority,
                                    ds.local, ds.peer_ip_b.decode(), ds.transport):  # fmt: skip
                return self.local_error(403, DENIED_BODY.decode(), "")
        result = router.route_request(ds.route_config, authority, self.path_b or b"/", self._header_map)
        if not result.forward:
            if result.direct is not None:
                direct = result.direct
                return self.local_error(direct.status, direct.body.decode("latin-1", "replace"), "", direct.body)
            return self.local_error(404, "no route", accesslog.NR)
        cluster = result.cluster
        if result.weighted:
            cluster = table.balancer.cluster_for(result.route.action)  # type: ignore[union-attr, arg-type]
        if cluster is not None and any_tls(cluster):  # never a plaintext downgrade (agent/proxy/tls_context.py)
            return self.local_error(503, "TLS origination for HTTP/2 clients is not supported", accesslog.UF)
        if cluster is None:
            if result.cluster_missing or result.weighted:  # the route's cluster does not exist: Envoy's NC
                return self.local_error(503, "", accesslog.NC)
            if ds.local[1] in proxy.listen_ports:
                return self.local_error(503, "no healthy upstream", accesslog.UF)
            addr = (normalise_ip(ds.local[0]), ds.local[1])
        else:
            addr = table.balancer.pick(cluster, ds.local)
            if addr is None:
                return self.local_error(503, "no healthy upstream", accesslog.UF)
        self.upstream_host = proxy.pool.key_for(addr)[1]
        if result.timeout_s:
            self.deadline = self.try_deadline = proxy.loop.time() + result.timeout_s
            proxy.watch_deadline(self)  # type: ignore[arg-type]
        h2 = cluster is not None and (cluster.http2 or cluster.downstream_protocol)  # this client speaks h2
        h2_upstream.open_stream(self, addr, ended, h2, result.connect_timeout_s)

    def upstream_buffered(self) -> int:
        """What the stream's upstream holds for it (H2Downstream.buffered_bytes)."""
        up = self.up
        return up.buffered_for(self) if up is not None else 0

    def _header_map(self) -> dict[str, str]:
        return header_map(self.fields)

    def upstream_headers(self) -> list[tuple[bytes, bytes]]:
        """The request's fields for an h2 upstream: pseudo-headers first."""
        return self.pseudo + self.fields

    def on_data(self, side: H2Side, data: bytes, flow_len: int) -> None:
        if side is self.ds:
            self.bytes_rx += len(data)
            if self.up is None:
                self.ds.ack(self.sid, flow_len)
                return
            pad = flow_len - len(data)
            if pad:
                self.ds.ack(self.sid, pad)
            self.up.send_body(self, data, False, self._ack_down)
        else:  # response body from an h2 upstream
            self.bytes_tx += len(data)
            pad = flow_len - len(data)
            if pad:
                side.ack(self.up_sid, pad)
            self.ds.send(self.sid, data, False, self._ack_up)

    def _ack_down(self, n: int) -> None:
        """n request bytes went upstream: the client may send as many more."""
        self.ds.ack(self.sid, n)

    def _ack_up(self, n: int) -> None:
        """n response bytes went to the client: the h2 upstream may send as many more."""
        up = self.up
        if up is not None:
            up.ack(self.up_sid, n)

    def on_trailers(self, side: H2Side, trailers: list[tuple[bytes, bytes]]) -> None:
        trailers = [(n.lower(), v) for n, v in trailers]
        # as on the HTTP/1 path: hop-by-hop and framing fields, and Host (trailers must not route) are dropped
        trailers = [(n, v) for n, v in trailers if n not in TRAILER_DROP and n[:1] != b":"]
        if side is self.ds:
            self.req_ended = True
            if self.up is not None:
                self.up.send_trailers(self, trailers)
        else:
            self.ds.send(self.sid, trailers, True)
            self.finish("")

    def on_end(self, side: H2Side) -> None:
        if side is self.ds:
            # Sending the end twice (after END_STREAM on the headers or trailers) would make h2 close the
            # upstream stream before its response arrived.
            if not self.req_ended:
                self.req_ended = True
                if self.up is not None:
                    self.up.send_body(self, b"", True, None)
        elif not self.done:
            self.ds.send(self.sid, b"", True)
            self.finish("")

    def on_reset(self, side: H2Side, code: int) -> None:
        if self.done:
            return
        if side is self.ds:  # the client cancelled (e.g. a gRPC deadline): cancel upstream too
            if self.up is not None:
                self.up.cancel(self)
            self.finish(accesslog.DC)
        elif self.status == 0:
            refused = code == h2.errors.ErrorCodes.REFUSED_STREAM
            if refused and side.reopen(self):  # type: ignore[attr-defined]
                return
            self.up_failed(503 if refused else 502, "upstream reset", accesslog.UC)
        else:
            self.ds.reset(self.sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.finish(accesslog.UC)

    # ---- upstream side ------------------------------------------------------------------------------

    def on_response_headers(self, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        """A response head from an h2 upstream (not validated by h2: names lower-cased here, and connection-
        specific fields dropped, as a client would otherwise reject the stream)."""
        out = []
        for n, v in headers:
            n = n.lower()
            if n == b":status":
                self.status = int(v)
            if n not in _RESPONSE_DROP:
                out.append((n, v))
        self.respond(out, end)

    def respond(self, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        """Send a response head already fit for h2 (status set by the caller)."""
        self.ds.respond(self.sid, headers, end)
        if end:
            self.finish("")

    def up_failed(self, status: int, message: str, flag: str) -> None:
        if self.done:
            return
        if self.status:
            self.ds.reset(self.sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.finish(flag)
        else:
            self.local_error(status, message, flag)

    def on_timeout(self, now: float) -> None:
        """Called by the proxy's deadline sweep once `try_deadline` has passed."""
        self.deadline = self.try_deadline = float("inf")
        if not self.done:
            self.ds.proxy.stats.upstream_timeouts += 1
            if self.up is not None:
                self.up.cancel(self)
            self.up_failed(504, "upstream request timeout", accesslog.UT)

    def local_error(self, status: int, message: str, flag: str, body: bytes | None = None, headers: tuple = ()) -> None:
        """A proxy-generated answer: an HTTP status, or a trailers-only gRPC status for gRPC requests. `body`: a
        direct response's own body (else the message and a newline); `headers`: more response fields."""
        self.status = status
        if self.grpc:
            fields = [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", str(GRPC_STATUS.get(status, 2)).encode()),
                (b"grpc-message", message.encode("latin-1", "replace")),
                *headers,
            ]
            self.ds.respond(self.sid, fields, True)
        else:
            if body is None:
                body = (message + "\n").encode("latin-1", "replace")
            self.ds.respond(
                self.sid,
                [
                    (b":status", str(status).encode()),
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
                False,
            )
            self.ds.send(self.sid, body, True)
        self.finish(flag)

    def finish(self, flag: str) -> None:
        if self.done:
            return
        self.done = True
        self.flags = flag
        if self.up is not None:
            self.up.release(self)
        ds = self.ds
        proxy = ds.proxy
        if self.deadline:
            proxy.inflight.discard(self)  # type: ignore[arg-type]
        ds.bridges.pop(self.sid, None)
        ds.stream_done(self, flag is accesslog.DC)
        stats = proxy.stats
        stats.requests_active -= 1
        duration_ms = (time.perf_counter() - self.t0) * 1000
        self.duration_ms = int(duration_ms)
        stats.record_response(self.status, duration_ms, self.bytes_rx, self.bytes_tx, self.flags)
        proxy.log.append(self)  # type: ignore[arg-type]


# h2_upstream builds on H2Side: imported last, used through the module (whichever of the two is imported first).
from planemesh.agent.proxy import h2_upstream  # noqa: E402
