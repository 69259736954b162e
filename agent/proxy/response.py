"""The response side of one request: the upstream's head re-framed for the client, body bytes, the end, and
what an upstream protocol error means. A mixin of Exchange (exchange.py), whose __slots__ hold the state."""

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
    connection_tokens,
    dropped_names,
    last_chunk,
    no_body_status,
    status_line,
)
from planemesh.agent.proxy.request_head import response_headers
from planemesh.agent.proxy.tunnel import upgrade_to_tunnel

if TYPE_CHECKING:
    from planemesh.agent.config import Route
    from planemesh.agent.proxy.contracts import ClientConn as Downstream
    from planemesh.agent.proxy.contracts import UpstreamConn as UpstreamConnection
    from planemesh.agent.proxy.retry import Retries

_perf = time.perf_counter


def switches(headers: list[tuple[bytes, bytes]], connection_values: list[bytes] | None) -> bool:
    """A 101 that really switches: an Upgrade header and `Connection: upgrade` (what llhttp stops on)."""
    return any(n == b"upgrade" for n, _ in headers) and any(
        b"upgrade" in connection_tokens(v) for v in connection_values or ()
    )


class ResponseRelay:
    __slots__ = ()
    # Declared by Exchange's __slots__:
    ds: Downstream
    conn: UpstreamConnection | None
    route: Route | None
    finished: bool
    version: str
    is_head: bool
    req_done: bool
    keep_alive: bool
    up_keep_alive: bool
    resp_started: bool
    status: int
    flags: str
    bytes_tx: int
    upstream_ms: int | None
    t_upstream: float
    up_framing: int
    ds_framing: int
    tunnel: int
    upgrade: bytes
    expect_continue: int

    def on_response_head(
        self,
        status: int,
        phrase: bytes,
        headers: list[tuple[bytes, bytes]],
        up_length: int | None,
        up_chunked: bool,
        up_keep_alive: bool,
        connection_values: list[bytes] | None,
    ) -> None:
        if self.finished:
            return
        if status == 101 and not (self.tunnel and switches(headers, connection_values)):
            self.on_upstream_protocol_error()  # a switch nobody asked for, or without Upgrade + Connection: upgrade
            return
        if status < 200 and status != 101:  # interim (100 Continue, 103): relay to 1.1 clients only
            if self.version == "1.1" and not (status == 100 and self.expect_continue):  # ours went already
                parts = [status_line(status, phrase)]
                append_headers(parts, headers, HOP_BY_HOP)
                parts.append(CRLF)
                self.ds.out.append(b"".join(parts))
            return
        self._end_attempt(status)
        retries = self.retries
        retriable = status >= 500 or status in retries.policy.retriable_status_codes
        if retriable and self.req_done and self._may_retry("status", status):
            self._retry()  # this response is dropped with its connection
            return
        if retriable and retries.policy.num_retries > 0 and retries.tries_left <= 0:
            self.flags = flags.URX
        self.upstream_ms = int((_perf() - self.t_upstream) * 1000)
        self.status = status
        self.resp_started = True
        self.up_keep_alive = up_keep_alive
        if connection_values is not None:  # what the upstream's Connection names goes before the route adds any
            named = dropped_names(connection_values)
            if named is not HOP_BY_HOP:
                headers = [(n, v) for n, v in headers if n not in named]
        route = self.route
        if route is not None and (route.response_headers_to_add or route.response_headers_to_remove):
            headers = response_headers(route, headers)
        parts = [status_line(status, phrase, self.version == "1.0")]
        append_headers(parts, headers, HOP_BY_HOP)
        if status == 101:  # switching protocols: the tunnel starts once the parser stops (on_upstream_upgraded)
            upgrade = next((v for n, v in headers if n == b"upgrade"), self.upgrade)
            parts += (UPGRADE_CONNECTION, b"upgrade: ", upgrade, CRLF, CRLF)
            self.ds.out.append(b"".join(parts))
            return
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
            if self.version == "1.1":
                self.ds_framing = FRAME_CHUNKED
                parts.append(CHUNKED)
            else:
                self.ds_framing = FRAME_CLOSE
                self.keep_alive = False
        if self.ds.proxy.draining or not self.req_done:
            self.keep_alive = False  # an early response while the client still sends: close afterwards
        if not self.keep_alive:
            parts.append(CONNECTION_CLOSE)
        elif self.version == "1.0":
            parts.append(KEEP_ALIVE_HEADER)
        parts.append(CRLF)
        self.ds.out.append(b"".join(parts))

    def on_response_body(self, data: bytes) -> None:
        if self.finished:
            return
        self.bytes_tx += len(data)
        self.ds.out.append(chunk(data) if self.ds_framing == FRAME_CHUNKED else data)

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """Trailers of a chunked response: relayed when the client's body is chunked too (an HTTP/1.0 client's
        close-delimited body has nowhere to carry them)."""
        if self.finished or self.ds_framing != FRAME_CHUNKED:
            return
        self.ds.out.append(last_chunk(trailers))
        self.ds_framing = FRAME_NONE  # the body has ended

    def on_response_complete(self) -> None:
        if self.finished:
            return
        if self.ds_framing == FRAME_CHUNKED:
            self.ds.out.append(LAST_CHUNK)
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.exchange = None
            # A connection that carried an upgrade request is never reused, whatever the answer was.
            if self.up_keep_alive and self.req_done and self.up_framing != FRAME_CLOSE and not self.tunnel:
                self.ds.proxy.pool.release(conn)
            else:
                conn.close()
        self.finish()

    def on_upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The upstream switched protocols (101): its connection and the client's become a byte tunnel;
        `rest` is what the upstream sent after its 101 head."""
        if self.finished:
            return
        if self.status != 101:  # llhttp stopped for a switch, yet the status was not 101
            self.on_upstream_protocol_error()
            conn.close()
            return
        upgrade_to_tunnel(self, conn, rest)  # type: ignore[arg-type]

    def on_upstream_protocol_error(self) -> None:
        if self.finished:
            return
        if self.resp_started:
            self.flags = flags.UPE
            self.keep_alive = False
            self.finish(abort=True)
        else:
            self.reply(502, b"upstream protocol error\n", (), flags.UPE)
        self.ds.flush()

    if TYPE_CHECKING:  # provided by UpstreamAttempts and Exchange
        retries: Retries

        def _end_attempt(self, status: int) -> None: ...
        def _may_retry(self, condition: str, status: int = 0) -> bool: ...
        def _retry(self, reuse: bool = False) -> None: ...
        def reply(self, status: int, body: bytes, headers=(), flag: str = "") -> None: ...
        def finish(self, abort: bool = False) -> None: ...
