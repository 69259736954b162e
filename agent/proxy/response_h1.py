"""The HTTP/1.x server side's response writer (contracts.DownstreamSink): what the response relay (response.py)
hands over, framed for an HTTP/1.x client: status line, end-to-end fields, content-length when known, else chunked
(close-delimited to an HTTP/1.0 client), trailers as chunked trailers, interim responses to 1.1 clients only."""

from __future__ import annotations

from operator import itemgetter
from typing import TYPE_CHECKING

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
    status_line,
)

_COLON = b": "
_name = itemgetter(0)

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import Fields, H1Request
    from planemesh.agent.proxy.messages import ResponseHead


class H1ResponseWriter:
    __slots__ = ("ds", "ds_framing", "ex")

    def __init__(self, ex: H1Request) -> None:
        self.ex = ex
        self.ds = ex.ds
        self.ds_framing = FRAME_NONE  # how the body is framed for the client (http1.FRAME_*)

    def interim(self, head: ResponseHead) -> None:
        """100 Continue, 103: to 1.1 clients only, and a 100 only when ours did not go already."""
        ex = self.ex
        if ex.version == "1.1" and not (head.status == 100 and ex.expect_continue):
            parts = [status_line(head.status, head.reason)]
            append_headers(parts, head.fields, HOP_BY_HOP)
            parts.append(CRLF)
            self.ds.out.append(b"".join(parts))

    def response_head(self, status: int, fields: Fields, head: ResponseHead) -> None:
        ex = self.ex
        parts = [status_line(status, head.reason, ex.version == "1.0")]
        if fields and HOP_BY_HOP.isdisjoint(map(_name, fields)):  # a codec's fields: end-to-end already (C only)
            parts += (CRLF.join(map(_COLON.join, fields)), CRLF)
        else:  # the route added some, or a peer's fields: filtered one by one
            append_headers(parts, fields, HOP_BY_HOP)
        if status == 101:  # switching protocols: the tunnel starts once the parser stops (on_upstream_upgraded)
            parts += (UPGRADE_CONNECTION, b"upgrade: ", head.upgrade or ex.upgrade, CRLF, CRLF)
            self.ds.out.append(b"".join(parts))
            return
        self._frame(parts, status, head.length, ex.relay.body_allowed)
        if self.ds.proxy.draining or not ex.req_done:
            ex.keep_alive = False  # an early response while the client still sends: close afterwards
        if not ex.keep_alive:
            parts.append(CONNECTION_CLOSE)
        elif ex.version == "1.0":
            parts.append(KEEP_ALIVE_HEADER)
        parts.append(CRLF)
        self.ds.out.append(b"".join(parts))

    def _frame(self, parts: list[bytes], status: int, length: int | None, body: bool) -> None:
        """How the body is delimited for the client, and its framing header."""
        if not body:
            self.ds_framing = FRAME_NONE
            if length is not None and status != 204 and status >= 200:
                parts.append(b"content-length: %d\r\n" % length)
        elif length is not None:
            self.ds_framing = FRAME_LENGTH
            parts.append(b"content-length: %d\r\n" % length)
        elif self.ex.version == "1.1":
            self.ds_framing = FRAME_CHUNKED
            parts.append(CHUNKED)
        else:
            self.ds_framing = FRAME_CLOSE
            self.ex.keep_alive = False

    def response_body(self, data: bytes) -> None:
        self.ds.out.append(chunk(data) if self.ds_framing == FRAME_CHUNKED else data)

    def response_trailers(self, trailers: Fields) -> None:
        """Trailers of a chunked response: relayed when the client's body is chunked too (an HTTP/1.0 client's
        close-delimited body has nowhere to carry them)."""
        if self.ds_framing == FRAME_CHUNKED:
            self.ds.out.append(last_chunk(trailers))
            self.ds_framing = FRAME_NONE  # the body has ended

    def response_end(self) -> None:
        if self.ds_framing == FRAME_CHUNKED:
            self.ds.out.append(LAST_CHUNK)
