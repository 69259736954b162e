"""An HTTP/1.x request (an Exchange) sent as a stream on a pooled h2c upstream connection (h2_upstream.py's
H2Upstream), for clusters with http2=True.

H2Stream is the attempt's `conn` (what the Exchange's flush_upstream writes to, what is closed when the attempt
ends) and the H2Upstream's stream owner (the callbacks a Bridge gets). The response goes through the Exchange's
ResponseRelay as if parsed from HTTP/1.1: status line, content-length when the server sent one, else chunked
(close-delimited to an HTTP/1.0 client), trailers as chunked trailers. Retries, timeouts, circuit breakers and
outlier reports stay the Attempt's (attempts.py).

Back-pressure: request DATA waiting for the server's window pauses reading from the client above WINDOW bytes;
response DATA is acknowledged (WINDOW_UPDATE) only once handed to a client transport that is not paused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import h2.errors

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.h2 import WINDOW
from planemesh.agent.proxy.h2_upstream import open_stream
from planemesh.agent.proxy.http1 import FRAME_NONE, HOP_BY_HOP
from planemesh.agent.proxy.messages import ResponseHead, h2_request_fields
from planemesh.agent.proxy.outlier import GATEWAY_FAILURE

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import H2Attempt as Attempt
    from planemesh.agent.proxy.h2_upstream import H2Upstream

_RESPONSE_DROP = HOP_BY_HOP - {b"content-length"}


def open_h2_attempt(attempt: Attempt, target: tuple[str, int]) -> None:
    """Start the attempt on `target` as a stream of a pooled h2c connection (opened when none has room); the
    request head goes out at once, the body as the Exchange flushes it."""
    ex = attempt.ex
    pool = attempt.ds.proxy.pool
    key, attempt.upstream_host = pool.key_for(target)
    attempt.upstream_key = key
    if attempt.h2_fields is None:
        te_trailers = any(n == b"te" and b"trailers" in v.lower() for n, v in ex.headers)
        attempt.h2_fields = h2_request_fields(ex.req_head, attempt.upstream_host, te_trailers)
    stream = H2Stream(attempt)
    open_stream(stream, target, stream.req_ended, True, attempt.connect_timeout_s)  # type: ignore[arg-type]
    if stream.up is not None and not ex.finished:
        attempt.on_connected(stream)  # type: ignore[arg-type]


class H2Stream:
    """One attempt of an Exchange as an h2 stream."""

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

    ready = True  # flush_upstream writes at once: the h2 connection queues until connected and within windows
    reused = False  # a lost stream is never "a pooled connection the server had closed": no silent re-send

    @property
    def cluster(self) -> Any:  # TLS origination (h2_upstream.open_stream) reads the attempt's cluster/endpoint
        return self.attempt.cluster

    @property
    def endpoint(self) -> Any:
        return self.attempt.endpoint

    def __init__(self, attempt: Attempt) -> None:
        ex = self.ex = attempt.ex
        self.attempt = attempt
        self.relay = ex.relay
        self.exchange = None  # the relay while the attempt uses this stream, as on an UpstreamConnection
        self.ds = ex.ds  # open_stream and H2Upstream.reopen reach the proxy through `ds.proxy`
        self.up: H2Upstream | None = None
        self.up_sid = 0
        self.reopened = 0
        self.bytes_rx = 0  # request body bytes sent (a stream with body sent is never re-opened elsewhere)
        self.body_left = ex.req_length  # a content-length body ends the stream with its last byte
        self.req_ended = not ex.req_chunked and not ex.req_length  # no body: END_STREAM on the headers
        self.resp_ended = False
        self.unsent = 0  # request bytes queued for the server's window
        self.write_paused = False  # the client's reading is paused for us
        self.reading_paused = False  # the client is slow: response DATA is not acknowledged
        self.held_acks = 0

    def upstream_headers(self) -> list[tuple[bytes, bytes]]:
        return self.attempt.h2_fields  # type: ignore[return-value]

    # ---- the request (what the Exchange writes) ------------------------------------------------------------

    def write(self, items: list) -> None:
        """Body pieces (bytes) and, for a chunked body, its end: a list of trailers (empty: none)."""
        up = self.up
        if up is None or self.req_ended:
            return
        for item in items:
            if type(item) is list:
                self.req_ended = True
                if item:
                    up.send_trailers(self, item)  # type: ignore[arg-type]
                else:
                    up.send_body(self, b"", True, None)  # type: ignore[arg-type]
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
            up.send_body(self, item, end, self._sent)  # type: ignore[arg-type]
            if end:
                self.req_ended = True
                break
        if self.unsent > WINDOW and not self.write_paused and self.up is not None:
            self.write_paused = True
            self.ds.pause_for_upstream()

    def _sent(self, n: int) -> None:
        self.unsent -= n
        if self.write_paused and self.unsent < WINDOW // 2:
            self.write_paused = False
            self.ds.resume_for_upstream()

    # ---- the response side's back-pressure (Downstream.pause_writing / resume_writing) -----------------------

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False
        n, self.held_acks = self.held_acks, 0
        if n and self.up is not None:
            self.up.ack(self.up_sid, n)

    # ---- the end of the attempt (Exchange: response complete, retry, timeout, client gone) -------------------

    def close(self) -> None:
        up = self.up
        self.up = None
        if self.write_paused:
            self.write_paused = False
            self.ds.resume_for_upstream()
        if up is not None:
            if not (self.req_ended and self.resp_ended):
                up.cancel(self)  # type: ignore[arg-type]
            up.release(self)  # type: ignore[arg-type]

    # ---- H2Upstream callbacks (those of a Bridge) --------------------------------------------------------------

    def on_response_headers(self, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.attempt.conn is not self:
            return
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
        if status < 200 or status > 999:
            return self.on_reset(self.up, h2.errors.ErrorCodes.PROTOCOL_ERROR)  # type: ignore[arg-type]
        # Without content-length the body is read to END_STREAM: chunked to a 1.1 client, close-delimited to a 1.0
        # one. Not reusable: the relay must close (release) this stream, not pool it.
        self.relay.on_response_head(ResponseHead(status, out, length))
        self.ds.flush()

    def on_data(self, side: H2Upstream, data: bytes, flow_len: int) -> None:
        if self.attempt.conn is not self:
            side.ack(self.up_sid, flow_len)
            return
        relay = self.relay
        if relay.ds_framing != FRAME_NONE:  # DATA on a response without a body (HEAD, 204, 304) is dropped
            relay.on_response_body(data)
            self.ds.flush()
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
        if refused and side.reopen(self):  # type: ignore[arg-type]
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
        """This stream is gone: the Exchange's attempt no longer has an upstream."""
        up = self.up
        self.up = None
        self.attempt.conn = None
        if self.write_paused:
            self.write_paused = False
            self.ds.resume_for_upstream()
        if up is not None:
            up.release(self)  # type: ignore[arg-type]


__all__ = ["H2Stream", "open_h2_attempt"]
