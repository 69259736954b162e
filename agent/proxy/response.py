"""The response side of one HTTP/1.x request (a ResponseRelay, owned by exchange.Exchange): the upstream's head
re-framed for the client, body bytes, trailers, the end, and what an upstream protocol error or a lost
connection means once the response started.

The relay owns the response's state (status, framing both ways, bytes sent, upstream time); what it needs of
the request goes through contracts.RelayOwner. It is what an upstream connection drives (contracts.ResponseSink).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.http1 import (
    CHUNKED,
    CONNECTION_CLOSE,
    CRLF,
    FRAME_CHUNKED,
    FRAME_CLOSE,
    FRAME_LENGTH,
    FRAME_NONE,
    HOP_BY_HOP,
    KEEP_ALIVE_HEADER,
    LAST_CHUNK,
    UPGRADE_CONNECTION,
    append_headers,
    chunk,
    last_chunk,
    no_body_status,
    status_line,
)
from planemesh.agent.proxy.request_head import response_headers
from planemesh.agent.proxy.tunnel import upgrade_to_tunnel

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import Fields, RelayOwner
    from planemesh.agent.proxy.contracts import UpstreamConn as UpstreamConnection
    from planemesh.agent.proxy.messages import ResponseHead

_perf = time.perf_counter


class ResponseRelay:
    __slots__ = ("bytes_tx", "ds", "ds_framing", "ex", "is_head", "started", "status", "up_framing",
                 "up_keep_alive", "upstream_ms")

    def __init__(self, ex: RelayOwner) -> None:
        self.ex = ex
        self.ds = ex.ds
        self.status = 0
        self.started = False  # a response head (ours or the upstream's) went to the client
        self.bytes_tx = 0
        self.upstream_ms: int | None = None
        self.up_framing = FRAME_NONE  # how the upstream delimits the body (http1.FRAME_*)
        self.ds_framing = FRAME_NONE  # how the body is re-framed for the client
        self.up_keep_alive = False
        self.is_head = False  # a response to HEAD (set with the request's own, by the downstream codec)

    def on_response_head(self, head: ResponseHead) -> None:
        """A response head from either upstream codec (messages.ResponseHead), re-framed for the client."""
        ex = self.ex
        if ex.finished:
            return
        status = head.status
        if status == 101 and not (ex.tunnel and head.upgrade is not None):
            self.on_upstream_protocol_error()  # a switch nobody asked for, or without Upgrade + Connection: upgrade
            return
        if status < 200 and status != 101:  # interim (100 Continue, 103): relay to 1.1 clients only
            if ex.version == "1.1" and not (status == 100 and ex.expect_continue):  # ours went already
                parts = [status_line(status, head.reason)]
                append_headers(parts, head.fields, HOP_BY_HOP)
                parts.append(CRLF)
                self.ds.out.append(b"".join(parts))
            return
        attempt = ex.attempt
        attempt.end(status)
        retries = attempt.retries
        retriable = status >= 500 or status in retries.policy.retriable_status_codes
        if retriable and ex.req_done and attempt.may_retry("status", status):
            attempt.retry()  # this response is dropped with its connection
            return
        if retriable and retries.policy.num_retries > 0 and retries.tries_left <= 0:
            ex.flags = flags.URX
        self.upstream_ms = int((_perf() - attempt.t_upstream) * 1000)
        self.status = status
        self.started = True
        self.up_keep_alive = head.reusable
        headers = head.fields  # what the upstream's Connection named is gone already, before the route adds any
        route = ex.route
        if route is not None and (route.response_headers_to_add or route.response_headers_to_remove):
            headers = response_headers(route, headers)
        parts = [status_line(status, head.reason, ex.version == "1.0")]
        append_headers(parts, headers, HOP_BY_HOP)
        if status == 101:  # switching protocols: the tunnel starts once the parser stops (on_upstream_upgraded)
            parts += (UPGRADE_CONNECTION, b"upgrade: ", head.upgrade or ex.upgrade, CRLF, CRLF)
            self.ds.out.append(b"".join(parts))
            return
        self._frame(parts, status, head.length, not head.until_close)
        if self.ds.proxy.draining or not ex.req_done:
            ex.keep_alive = False  # an early response while the client still sends: close afterwards
        if not ex.keep_alive:
            parts.append(CONNECTION_CLOSE)
        elif ex.version == "1.0":
            parts.append(KEEP_ALIVE_HEADER)
        parts.append(CRLF)
        self.ds.out.append(b"".join(parts))

    def _frame(self, parts: list[bytes], status: int, up_length: int | None, up_chunked: bool) -> None:
        """How the body is delimited on both sides, and the framing header for the client."""
        ex = self.ex
        if self.is_head or no_body_status(status):
            self.up_framing = FRAME_NONE
            self.ds_framing = FRAME_NONE
            if up_length is not None and status != 204 and status >= 200:
                parts.append(b"content-length: %d\r\n" % up_length)
        elif up_length is not None:
            self.up_framing = self.ds_framing = FRAME_LENGTH
            parts.append(b"content-length: %d\r\n" % up_length)
        else:
            self.up_framing = FRAME_CHUNKED if up_chunked else FRAME_CLOSE
            if not up_chunked:
                self.up_keep_alive = False
            if ex.version == "1.1":
                self.ds_framing = FRAME_CHUNKED
                parts.append(CHUNKED)
            else:
                self.ds_framing = FRAME_CLOSE
                ex.keep_alive = False

    def on_response_body(self, data: bytes) -> None:
        if self.ex.finished:
            return
        self.bytes_tx += len(data)
        self.ds.out.append(chunk(data) if self.ds_framing == FRAME_CHUNKED else data)

    def on_response_trailers(self, trailers: Fields) -> None:
        """Trailers of a chunked response: relayed when the client's body is chunked too (an HTTP/1.0 client's
        close-delimited body has nowhere to carry them)."""
        if self.ex.finished or self.ds_framing != FRAME_CHUNKED:
            return
        self.ds.out.append(last_chunk(trailers))
        self.ds_framing = FRAME_NONE  # the body has ended

    def on_response_complete(self) -> None:
        ex = self.ex
        if ex.finished:
            return
        if self.ds_framing == FRAME_CHUNKED:
            self.ds.out.append(LAST_CHUNK)
        attempt = ex.attempt
        conn = attempt.conn
        attempt.conn = None
        if conn is not None:
            conn.exchange = None
            # A connection that carried an upgrade request is never reused, whatever the answer was.
            if self.up_keep_alive and ex.req_done and self.up_framing != FRAME_CLOSE and not ex.tunnel:
                self.ds.proxy.pool.release(conn)
            else:
                conn.close()
        ex.finish()

    def on_upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The upstream switched protocols (101): its connection and the client's become a byte tunnel;
        `rest` is what the upstream sent after its 101 head."""
        if self.ex.finished:
            return
        if self.status != 101:  # llhttp stopped for a switch, yet the status was not 101
            self.on_upstream_protocol_error()
            conn.close()
            return
        upgrade_to_tunnel(self.ex, conn, rest)  # type: ignore[arg-type]

    def on_upstream_protocol_error(self) -> None:
        ex = self.ex
        if ex.finished:
            return
        if self.started:
            ex.abort(flags.UPE)
        else:
            ex.reply(502, b"upstream protocol error\n", (), flags.UPE)
        self.ds.flush()

    def on_upstream_lost(self, conn: UpstreamConnection) -> None:
        """The upstream connection closed (or broke) before the response completed."""
        ex = self.ex
        if ex.finished:
            return
        ex.attempt.conn = None
        if not self.started:
            ex.attempt.lost(conn)
            return
        if self.up_framing == FRAME_CLOSE:  # close-delimited body: this is its end
            if self.ds_framing == FRAME_CHUNKED:
                self.ds.out.append(LAST_CHUNK)
            ex.finish()
        else:
            ex.abort(flags.UC)
        self.ds.flush()
