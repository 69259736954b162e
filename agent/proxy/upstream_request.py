"""The request on its way upstream, whatever the codecs (an UpstreamRequest, owned by exchange.Exchange for
HTTP/1.x and h2_stream.Bridge for an h2 stream, beside their Attempt): what goes to the attempt's upstream stream
next, framed for its codec (HTTP/1.1: the head's bytes, then the body, chunked when its length is unknown; h2:
body pieces, and a list of trailers, empty or not, to end a body of unknown length), the copy a new attempt
replays (up to retry.MAX_REPLAY_BODY), and the client's trailers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from planemesh.agent.proxy.http1 import LAST_CHUNK, chunk, last_chunk
from planemesh.agent.proxy.retry import MAX_REPLAY_BODY

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import Fields, H2Attempt


class UpstreamRequest:
    __slots__ = ("attempt", "body_copy", "body_len", "chunked", "head", "out", "streamed", "trailers")

    def __init__(self, attempt: H2Attempt) -> None:
        self.attempt = attempt  # its `h2` (the framing) and `conn` (where flush() writes)
        self.out: list = []  # what goes upstream next
        self.head = b""  # the request head as HTTP/1.1 bytes (an HTTP/1.1 upstream's first bytes; mirrors)
        self.chunked = False  # a body of unknown length (HTTP/1.1: chunked; h2: DATA until the end)
        self.trailers: Fields | None = None  # the client's
        self.body_copy: list[bytes] | tuple | None = ()  # the body so far while small enough to replay (a list
        # from its first piece on: no list for a request without a body)
        self.body_len = 0
        self.streamed = False  # body bytes went out

    def body(self, data: bytes) -> None:
        self.streamed = True
        copy = self.body_copy
        if copy is not None:
            self.body_len += len(data)
            if self.body_len > MAX_REPLAY_BODY:
                self.body_copy = None  # too big to replay: no retry once any of it went out
            elif copy:
                copy.append(data)  # type: ignore[union-attr]
            else:
                self.body_copy = [data]
        self.out.append(chunk(data) if self.chunked and not self.attempt.h2 else data)

    def end(self) -> None:
        """The client's end of the request; a content-length body has ended with its last byte already."""
        if self.chunked:
            self.out.append(self.last())

    def last(self) -> bytes | Fields:
        """The end of a body of unknown length: the last chunk with the client's trailers (HTTP/1.1), or the
        trailers (h2; empty: END_STREAM alone)."""
        if self.attempt.h2:
            return self.trailers or []
        return self.h1_last()

    def h1_last(self) -> bytes:
        return LAST_CHUNK if self.trailers is None else last_chunk(self.trailers)

    def replayable(self) -> bool:
        """Nothing of the body went out yet, or all of it is buffered (within MAX_REPLAY_BODY)."""
        return not self.streamed or self.body_copy is not None

    def rearm(self, ended: bool) -> None:
        """What a new attempt sends: the head (HTTP/1.1; an h2 stream's is its HEADERS) and the buffered body
        again, framed as before; body still to come is added as usual. `ended`: the client's end arrived."""
        h2 = self.attempt.h2
        out: list = [] if h2 else [self.head]
        framed = self.chunked and not h2
        for data in self.body_copy or ():
            out.append(chunk(data) if framed else data)
        if ended and self.chunked:
            out.append(self.last())
        self.out = out

    def flush(self) -> None:
        """What waits goes to the attempt's upstream stream, once it is open."""
        attempt = self.attempt
        conn = attempt.conn
        out = self.out
        if conn is not None and out and conn.ready:
            if attempt.h2:
                self.out = []
                conn.write(out)  # type: ignore[attr-defined]
                return
            data = b"".join(out) if len(out) > 1 else out[0]
            out.clear()
            conn.transport.write(data)  # type: ignore[attr-defined]

    def buffered(self) -> int:
        """Bytes waiting to go upstream (the overload manager's measure)."""
        return sum(len(x) for x in self.out if type(x) is bytes)
