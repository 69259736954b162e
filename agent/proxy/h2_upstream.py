"""The h2 client side: pooled, multiplexed h2c (or h2 over TLS) upstream connections for clusters with http2=True
(H2Upstream, pooled per endpoint by the proxy's H2Pool), and one request's stream on one (H2ClientStream).

H2ClientStream is the h2 client codec of one request: an upstream stream (contracts.UpstreamStream) as an
upstream.UpstreamConnection is for HTTP/1.1. The request's Attempt (attempts.py) opens it, the request writes its
neutral request to it (the head as h2 fields from messages.RequestHead, body pieces, trailers or the end), and it
delivers the neutral response events to the request's ResponseRelay (response.py), whatever the client speaks.
Retries, timeouts, circuit breakers and outlier reports stay the Attempt's.

Back-pressure: request DATA waiting for the server's window pauses the request's source (contracts.RequestSource)
past its upstream_window; response DATA is acknowledged (WINDOW_UPDATE) only while the client side reads.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

import h2.errors
import h2.events
import h2.exceptions

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.circuit import CONNECTIONS
from planemesh.agent.proxy.h2 import H2Side
from planemesh.agent.proxy.http1 import HOP_BY_HOP
from planemesh.agent.proxy.messages import ResponseHead, h2_request_fields
from planemesh.agent.proxy.outlier import GATEWAY_FAILURE
from planemesh.agent.proxy.sockets import open_upstream
from planemesh.agent.proxy.tls_context import originate_tls
from planemesh.model.tls_config import endpoint_tls

if TYPE_CHECKING:
    from planemesh.agent.proxy.circuit import CircuitBreaker
    from planemesh.agent.proxy.contracts import H2Attempt as Attempt
    from planemesh.agent.proxy.contracts import Proxy as PlaneProxy

MAX_STREAMS_PER_CONN = 1000
# Streams opened on a new h2c connection before the server's SETTINGS arrive (nghttp2's assumed peer default):
# above the server's real limit, the surplus would be refused.
STREAMS_BEFORE_SETTINGS = 100
WAITING_PRUNE_AT = 256  # entries in a key's waiting queue before those no longer waiting are dropped
MAX_REOPEN = 5  # times a refused body-less stream is opened again (a server past its streams per connection)
# Response fields of an h2 server that a ResponseHead does not carry: the connection-specific ones (and te,
# trailer); content-length becomes the head's length.
_RESPONSE_DROP = HOP_BY_HOP - {b"content-length"}


class H2Pool:
    """A plane proxy's h2c (and h2 over TLS) upstream connections, per (address, port, source, mark[, TLS]):
    owned by the PlaneProxy (server.py), whose drain() closes them with close_all()."""

    def __init__(self, proxy: PlaneProxy) -> None:
        self.proxy = proxy
        self.conns: dict[tuple, list[H2Upstream]] = {}
        # per key, the attempts waiting for a stream (Envoy's pending requests), oldest first; an entry whose
        # attempt stopped waiting (granted a connection unit, timed out, its client gone) is skipped
        # (with the times its stream was refused and opened again: MAX_REOPEN holds across the wait)
        self.waiting: dict[tuple, deque[tuple[Attempt, tuple[str, int], int]]] = {}

    def open(self, stream: H2ClientStream, addr: tuple[str, int], ended: bool, connect_timeout: float,
             key: tuple | None = None) -> bytes | None:
        """`stream` on the first connection to `addr` with a free stream (a new connection when none has one).
        Circuit breakers count as Envoy's do: a new connection takes a `max_connections` unit of the cluster's
        breaker for its lifetime, a stream waiting for its connection to be made a `max_pending_requests` unit;
        a stream on an established connection takes neither. With every connection unit taken and no free stream
        the attempt waits as a pending request, as in Envoy's pool: for a stream to come free on a connection to
        `addr`, or for a unit. The breaker's refusal (the overloaded value: no pending unit left), or None."""
        proxy = self.proxy
        if key is None:
            key = proxy.pool.key_for(addr)[0]
        attempt = stream.attempt
        cluster = attempt.cluster
        if cluster is not None and (tls := endpoint_tls(cluster, attempt.endpoint, addr)) is not None:
            key = (*key, tls)  # h2 over TLS (agent/proxy/tls_context.py): its own connections
        conns = self.conns.get(key)
        if conns is None:
            conns = self.conns[key] = []
        for conn in conns:  # the first connection with a free stream
            if conn.has_capacity():
                if conn.transport is None:
                    if not attempt.hold_pending():
                        return b"cluster_pending"
                    attempt.give_back_connection_unit()
                else:
                    attempt.on_free_stream()
                break
        else:
            breaker = attempt.breaker
            if not attempt.take_connection_unit():
                if not attempt.hold_pending():
                    return b"cluster_pending"
                self._wait(key, attempt, addr, stream.reopened)
                return None
            if not attempt.hold_pending():
                if breaker is not None:
                    breaker.release(CONNECTIONS)
                return b"cluster_pending"
            conn = H2Upstream(proxy, self, key, conns, connect_timeout, breaker)
            conns.append(conn)
        conn.open(stream, stream.upstream_headers(), ended)
        return None

    def _wait(self, key: tuple, attempt: Attempt, addr: tuple[str, int], reopened: int) -> None:
        attempt.wait_for_connection(addr)
        queue = self.waiting.get(key)
        if queue is None:
            queue = self.waiting[key] = deque()
        elif len(queue) >= WAITING_PRUNE_AT:  # entries of attempts that stopped waiting: dropped now and then
            queue = self.waiting[key] = deque(entry for entry in queue if entry[0].waiting is not None)
        queue.append((attempt, addr, reopened))

    def stream_freed(self, key: tuple) -> None:
        """A connection to `key` has a free stream: the longest waiting attempt takes it, on the next loop pass
        (out of the call stack of the stream that ended)."""
        queue = self.waiting.get(key)
        while queue:
            attempt, addr, reopened = queue.popleft()
            if attempt.stop_waiting():
                self.proxy.loop.call_soon(_resume, attempt, addr, reopened)
                break
        if not queue:
            self.waiting.pop(key, None)

    def sweep(self, idle_timeout_s: float) -> None:
        """Close the connections without a stream for longer than `idle_timeout_s` (the HTTP/1.1 pool's idle
        timeout: Envoy's upstream `idle_timeout` applies to both protocols); called from the proxy's tick."""
        deadline = self.proxy.loop.time() - idle_timeout_s
        for pool in list(self.conns.values()):
            for conn in [c for c in pool if not c.bridges and 0 < c.idle_since < deadline]:
                conn.shut()  # leaves `pool` when its transport is lost (_forget)
                conn._forget()

    def close_all(self) -> None:
        """Close every connection (drain's end): those still connecting are cancelled, their streams fail."""
        conns = [conn for pool in self.conns.values() for conn in pool]
        self.conns.clear()
        for conn in conns:
            conn.shut()


def _resume(attempt: Attempt, addr: tuple[str, int], reopened: int) -> None:
    if not attempt.ex.finished:
        open_h2_stream(attempt, addr, reopened)


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

    def __init__(self, proxy: PlaneProxy, owner: H2Pool, key: tuple, pool: list[H2Upstream], timeout: float,
                 breaker: CircuitBreaker | None = None) -> None:
        super().__init__(proxy)
        self.owner = owner
        self.key = key
        self.pool = pool
        self.timeout = timeout
        self.breaker = breaker  # whose max_connections unit this connection holds until it is gone
        self.unflushed: list[H2ClientStream] = []  # streams to flush at the end of the read being handled
        self.goaway = False
        self.settings_received = False
        self.idle_since = 0.0  # loop time its last stream ended (0: it has streams, or never had one)
        self._init_conn()
        proxy.stats.upstream_total += 1
        self.task = proxy.loop.create_task(_connect(proxy, key, timeout, lambda: self))
        self.task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self.proxy.stats.upstream_connect_failures += 1
            self._forget()
            self._release_unit()
            self.closed = True
            for stream in list(self.bridges.values()):
                stream.up = None
                stream.up_failed(503, "upstream connect error", flags.UF)
            self.bridges.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy.stats.upstream_active += 1
        for stream in self.bridges.values():  # they waited for this connection (H2Pool.open's pending units)
            stream.connection_made()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.stats.upstream_active -= 1
        self._forget()
        self._release_unit()
        super().connection_lost(exc)

    def _release_unit(self) -> None:
        """The connection is gone (or was never made): its max_connections unit goes back, once."""
        breaker, self.breaker = self.breaker, None
        if breaker is not None:
            breaker.release(CONNECTIONS)

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
        streams = self.unflushed
        if streams:  # the client sides of the streams that got response pieces in this read
            self.unflushed = []
            for stream in streams:
                stream.ds.flush()
        if self.goaway and not self.bridges and not self.closed:
            self.close()

    def on_goaway(self, last_stream_id: int) -> None:
        self.goaway = True
        self._forget()
        super().on_goaway(last_stream_id)

    def reopen(self, stream: H2ClientStream) -> bool:
        """A stream this server refused (not processed): open it again elsewhere when nothing but its headers
        went out (at most MAX_REOPEN times: a server may refuse everything)."""
        if stream.reopened >= MAX_REOPEN or not stream.req_ended or stream.bytes_rx:
            return False
        stream.reopened += 1
        self.bridges.pop(stream.up_sid, None)
        try:
            self.conn.reset_stream(stream.up_sid, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:
            pass
        self._after_stream()
        stream.up = None
        if self.owner.open(stream, (self.key[0], self.key[1]), True, self.timeout) is not None:
            return False  # refused by the cluster's breaker: lost here (retried or answered as any reset)
        if stream.up is None:  # it waits for a stream (H2Pool._wait): a new one is opened for its attempt then
            stream.attempt.conn = None
        return True

    def open(self, stream: H2ClientStream, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=ended)
        self.bridges[sid] = stream
        self.idle_since = 0.0
        stream.up = self
        stream.up_sid = sid
        self.flush()

    def handle(self, event: h2.events.Event) -> None:
        kind = type(event)
        if kind is h2.events.ResponseReceived:
            stream = self.bridges.get(event.stream_id)
            if stream is not None:
                stream.on_response_headers(event.headers, event.stream_ended is not None)
            return
        if kind is h2.events.RemoteSettingsChanged:
            self.settings_received = True
        super().handle(event)

    # ---- what an H2ClientStream calls ---------------------------------------------------------------------

    def send_body(self, stream: H2ClientStream, data: bytes, end: bool, on_sent) -> None:
        self.send(stream.up_sid, data, end, on_sent)

    def send_trailers(self, stream: H2ClientStream, trailers: list[tuple[bytes, bytes]]) -> None:
        self.send(stream.up_sid, list(trailers), True)  # type: ignore[arg-type]

    def cancel(self, stream: H2ClientStream) -> None:
        self.reset(stream.up_sid)

    def buffered_for(self, stream: H2ClientStream) -> int:
        """Request bytes of the stream waiting for this connection's window (the overload manager's measure)."""
        queue = self.queues.get(stream.up_sid)
        return sum(len(item[0]) for item in queue if type(item[0]) is not list) if queue else 0

    def release(self, stream: H2ClientStream) -> None:
        self.bridges.pop(stream.up_sid, None)
        self._after_stream()

    def _after_stream(self) -> None:
        """A stream left: a waiting attempt may have it; after a GOAWAY the last one closes the connection, else
        it starts the idle clock."""
        if self.key in self.owner.waiting and self.has_capacity():
            self.owner.stream_freed(self.key)
        if not self.bridges:
            if self.goaway:
                self.close()
            else:
                self.idle_since = self.proxy.loop.time()


def _response_head(headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]], int | None]:
    """(:status, the end-to-end fields, content-length) of an h2 response head (not validated by the codec: names
    lower-cased here, connection-specific fields dropped, as a client would reject the stream otherwise)."""
    status = 0
    length = None
    out = []
    for n, v in headers:
        n = n.lower()
        if n[:1] == b":":
            if n == b":status":
                status = int(v)
        elif n == b"content-length":
            length = int(v)
        elif n not in _RESPONSE_DROP:
            out.append((n, v))
    return status, out, length


# Response heads repeat (a server's same fields; the decoder hands the same tuples back for the same block): each
# distinct one is worked out once. Bounded (heads come from peers): the memo starts afresh when full.
_HEADS: dict[tuple, tuple[int, list[tuple[bytes, bytes]], int | None]] = {}
HEADS_MEMO_MAX = 256


def open_h2_stream(attempt: Attempt, target: tuple[str, int], reopened: int = 0) -> None:
    """Start the attempt on `target` as a stream of a pooled h2c connection (opened when none has room); the
    request head goes out at once, the body as the request flushes it."""
    ex = attempt.ex
    proxy = attempt.ds.proxy
    key, attempt.upstream_host = proxy.pool.key_for(target)
    attempt.upstream_key = key
    if attempt.h2_fields is None:  # an HTTP/1.x request (an h2 stream's are its own, its :scheme included)
        te_trailers = any(n == b"te" and b"trailers" in v.lower() for n, v in ex.headers)
        tls = attempt.ds.transport.get_extra_info("ssl_object") is not None  # terminated here
        attempt.h2_fields = h2_request_fields(ex.req_head, attempt.upstream_host, te_trailers,
                                              b"https" if tls else b"http")
    stream = H2ClientStream(attempt)
    stream.reopened = reopened
    refusal = proxy.h2_pool.open(stream, target, stream.req_ended, attempt.connect_timeout_s, key)
    if refusal is not None:  # the cluster's breaker: no room for one more waiting
        attempt.end(-1)
        ex.overloaded(refusal)
        return
    if stream.up is not None and not ex.finished:
        attempt.on_connected(stream)  # type: ignore[arg-type]


class H2ClientStream:
    """One attempt of a request as an h2 stream (contracts.UpstreamStream)."""

    __slots__ = (
        "attempt",
        "body_left",
        "bytes_rx",
        "ds",
        "ex",
        "exchange",
        "held_acks",
        "reading_paused",
        "relay",
        "reopened",
        "req_ended",
        "resp_ended",
        "unsent",
        "up",
        "up_sid",
        "write_paused",
    )

    ready = True  # the request writes at once: the h2 connection queues until connected and within windows
    reused = False  # a lost stream is never "a pooled connection the server had closed": no silent re-send

    @property
    def cluster(self) -> Any:  # TLS origination (H2Pool.open) reads the attempt's cluster and endpoint
        return self.attempt.cluster

    @property
    def endpoint(self) -> Any:
        return self.attempt.endpoint

    def __init__(self, attempt: Attempt) -> None:
        ex = self.ex = attempt.ex
        self.attempt = attempt
        self.relay = ex.relay
        self.exchange = None  # the relay while the attempt uses this stream, as on an UpstreamConnection
        self.ds = attempt.ds  # the request's source: flushes, request back-pressure, the proxy
        self.up: H2Upstream | None = None
        self.up_sid = 0
        self.reopened = 0
        self.bytes_rx = 0  # request body bytes sent (a stream with body sent is never re-opened elsewhere)
        self.body_left = ex.req_length  # a content-length body ends the stream with its last byte
        self.req_ended = not ex.req_chunked and not ex.req_length  # no body: END_STREAM on the headers
        self.resp_ended = False
        self.unsent = 0  # request bytes queued for the server's window
        self.write_paused = False  # the request's source is paused for us
        self.reading_paused = False  # the client side is slow: response DATA is not acknowledged
        self.held_acks = 0

    def upstream_headers(self) -> list[tuple[bytes, bytes]]:
        return self.attempt.h2_fields  # type: ignore[return-value]

    def connection_made(self) -> None:
        """Its connection is established: the attempt no longer waits for one (its pending unit)."""
        attempt = self.attempt
        if attempt.conn is self:
            attempt.release_pending()

    # ---- the request (what the request's flush_upstream writes) ------------------------------------------------

    def write(self, items: list) -> None:
        """Body pieces (bytes) and, for a body of unknown length, its end: a list of trailers (empty: none)."""
        up = self.up
        if up is None or self.req_ended:
            return
        for item in items:
            if type(item) is list:
                self.req_ended = True
                if item:
                    up.send_trailers(self, item)
                else:
                    up.send_body(self, b"", True, None)
                return
            if not item:
                continue
            n = len(item)
            self.bytes_rx += n
            end = False
            if self.body_left:
                self.body_left -= n
                end = self.body_left <= 0
            self.unsent += n
            up.send_body(self, item, end, self._sent)
            if end:
                self.req_ended = True
                break
        if self.unsent > self.ds.upstream_window and not self.write_paused and self.up is not None:
            self.write_paused = True
            self.ds.pause_for_upstream()

    def _sent(self, n: int) -> None:
        self.unsent -= n
        if self.write_paused and self.unsent <= self.ds.upstream_window // 2:
            self.write_paused = False
            self.ds.resume_for_upstream()

    def buffered(self) -> int:
        """Request bytes waiting for the server's window (the overload manager's measure)."""
        up = self.up
        return up.buffered_for(self) if up is not None else 0

    # ---- the response side's back-pressure (the client side is slow) -------------------------------------------

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False
        n, self.held_acks = self.held_acks, 0
        if n and self.up is not None:
            self.up.ack(self.up_sid, n)

    # ---- the end of the attempt (response complete, retry, timeout, client gone) --------------------------------

    def close(self) -> None:
        up = self.up
        self.up = None
        if self.write_paused:
            self.write_paused = False
            self.ds.resume_for_upstream()
        if up is not None:
            if not (self.req_ended and self.resp_ended):
                up.cancel(self)
            up.release(self)

    # ---- H2Upstream callbacks: the stream's events ------------------------------------------------------------

    def on_response_headers(self, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.attempt.conn is not self:
            return
        key = tuple(headers)
        found = _HEADS.get(key)
        if found is None:
            found = _response_head(headers)
            if len(_HEADS) >= HEADS_MEMO_MAX:
                _HEADS.clear()
            _HEADS[key] = found
        status, out, length = found
        if status < 200 or status > 999:
            return self.on_reset(self.up, h2.errors.ErrorCodes.PROTOCOL_ERROR)  # type: ignore[arg-type]
        # Not reusable: the relay closes (releases) this stream, it does not pool it.
        self.relay.on_response_head(ResponseHead(status, list(out), length, False, False, b"", None, end))
        self._flush_after_read()

    def _flush_after_read(self) -> None:
        """The request's client side is flushed once the read that brought this piece is handled (H2Upstream.
        data_received): a response's head, body and trailers of one read leave together."""
        up = self.up
        if up is None:  # no longer this attempt's stream (a retry, an answer of the proxy's): at once
            self.ds.flush()
        else:
            up.unflushed.append(self)

    def on_data(self, side: H2Upstream, data: bytes, flow_len: int) -> None:
        if self.attempt.conn is not self:
            side.ack(self.up_sid, flow_len)
            return
        self.relay.on_response_body(data)  # dropped there when the response has no body (HEAD, 204, 304)
        self._flush_after_read()
        if self.reading_paused or self.ds.write_paused:
            self.reading_paused = True
            self.held_acks += flow_len
        else:
            side.ack(self.up_sid, flow_len)

    def on_trailers(self, side: H2Upstream, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.attempt.conn is not self:
            return
        self.relay.on_response_trailers([(n.lower(), v) for n, v in trailers if n[:1] != b":"])
        self.on_end(side)

    def on_end(self, side: H2Upstream) -> None:
        if self.attempt.conn is not self or self.resp_ended:
            return
        self.resp_ended = True
        if self.relay.status == 0:  # END_STREAM before any response head
            return self.on_reset(side, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        self.relay.on_response_complete()
        self.ds.flush()

    def on_reset(self, side: H2Upstream, code: int) -> None:
        """The server reset the stream, sent GOAWAY below it, or the connection was lost."""
        ex = self.ex
        attempt = self.attempt
        if attempt.conn is not self or ex.finished:
            return
        if self.relay.started:
            self._lost()
            ex.abort(flags.UC)
            self.ds.flush()
            return
        refused = code == h2.errors.ErrorCodes.REFUSED_STREAM
        if refused and side.reopen(self):
            return  # not processed: opened again on another connection
        self._lost()
        attempt.end(GATEWAY_FAILURE)
        if attempt.may_retry("reset") or (refused and attempt.may_retry("refused-stream")):
            attempt.retry()
        else:
            ex.reply(502, b"upstream reset before response headers\n", (), attempt.exhausted(flags.UC))
        self.ds.flush()

    def up_failed(self, status: int, message: str, flag: str) -> None:
        """The h2c connection could not be opened (H2Upstream._connected)."""
        if self.attempt.conn is not self or self.ex.finished:
            return
        self._lost()
        self.attempt.on_connect_failed(False)

    def _lost(self) -> None:
        """This stream is gone: the request's attempt no longer has an upstream."""
        up = self.up
        self.up = None
        self.attempt.conn = None
        if self.write_paused:
            self.write_paused = False
            self.ds.resume_for_upstream()
        if up is not None:
            up.release(self)


__all__ = ["H2ClientStream", "H2Pool", "H2Upstream", "open_h2_stream"]
