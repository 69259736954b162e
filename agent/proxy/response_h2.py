"""The h2 server side's response writer (contracts.DownstreamSink) of one request stream (h2_stream.Bridge):
what the response relay (response.py) hands over, as this stream's frames: HEADERS with :status and the
end-to-end fields (content-length when known), DATA, trailers. Interim responses are not relayed.

It also holds the stream's share of the client connection's response-buffer budget (h2_guard.py): body read from
the upstream stream and not yet sent to the client counts against it, and past the stream's own limit or the
connection's budget the upstream stream is not read (an HTTP/1.1 connection: TCP; an h2 stream: its window);
reading slots are handed out oldest first as the client takes what waits (wake_readers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from planemesh.agent.proxy.http1 import NEVER_HOP_BY_HOP, TRAILER_DROP

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import Fields
    from planemesh.agent.proxy.contracts import H2Client as H2Downstream
    from planemesh.agent.proxy.messages import ResponseHead


class H2ResponseWriter:
    __slots__ = ("attempt", "client", "ended", "pending", "queued_down", "reading", "sid", "stream", "trailers")

    def __init__(self, stream) -> None:  # h2_stream.Bridge
        self.stream = stream
        self.attempt = stream.attempt  # its conn is the upstream stream read for this one
        self.client: H2Downstream = stream.client
        self.sid = stream.sid
        self.pending: list[bytes] = []  # body read, not handed to the client's stream yet
        self.queued_down = 0  # body handed to the client's stream, not sent yet (or pending)
        self.trailers: Fields | None = None
        self.ended = False
        self.reading = False  # holds one of the client connection's upstream reading slots (h2_guard.py)

    def interim(self, head: ResponseHead) -> None:
        """Interim responses (100 Continue, 103) are not relayed to h2 clients."""

    def response_head(self, status: int, fields: Fields, head: ResponseHead) -> None:
        out = [(b":status", _STATUS.get(status) or _status_bytes(status))]
        out += [(n, v) for n, v in fields if n not in NEVER_HOP_BY_HOP]  # no Host in a response to h2
        if head.length is not None:
            out.append((b"content-length", b"%d" % head.length))
        self.stream.status = status
        self.ended = head.ended
        self.client.respond(self.sid, out, head.ended)

    def response_body(self, data: bytes) -> None:
        """Body bytes wait for the end of this read (flush) or of the response: one DATA frame, END_STREAM on
        the last, instead of a frame per parser callback and an empty one to end the stream."""
        self.pending.append(data)
        n = len(data)
        self.queued_down += n
        guard = self.client.guard
        guard.buffered += n
        # Bounded per stream and per client connection (a client with a zero window and many streams): the
        # upstream is not read until the client takes what waits.
        conn = self.attempt.conn
        limit = guard.limits.buffer_limit_bytes  # the stream's own limit, and the connection's (over_budget)
        if conn is not None and (self.queued_down > limit or guard.buffered >= limit):
            conn.pause_reading()
            self._leave()
            self.client.paused_up[self] = None

    def response_trailers(self, trailers: Fields) -> None:
        self.trailers = [(n, v) for n, v in trailers if n not in TRAILER_DROP]

    def response_end(self) -> None:
        if self.ended:
            return  # END_STREAM went with the head
        self.ended = True
        client = self.client
        data = self._body_out()
        if self.trailers:
            if data:
                client.send(self.sid, data, False, self._sent_down)
            client.send(self.sid, self.trailers, True)
        else:
            client.send(self.sid, data, True, self._sent_down if data else None)

    def flush(self) -> None:
        """The body read so far goes to the client's stream (one DATA frame per upstream read)."""
        if self.pending:
            self.client.send(self.sid, self._body_out(), False, self._sent_down)

    def _body_out(self) -> bytes:
        body = self.pending
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        return data

    def _sent_down(self, n: int) -> None:
        self.queued_down -= n
        client = self.client
        client.guard.buffered -= n
        if client.paused_up and client.guard.may_read():
            wake_readers(client)

    def connected(self) -> None:
        """The upstream stream is open (Attempt.on_connected): its reading slot is decided afresh."""
        conn = self.attempt.conn
        if conn is not None and not self.reading:
            client = self.client
            if client.paused_up:
                client.paused_up.pop(self, None)
            guard = client.guard
            if self._client_window_open() and not guard.over_budget():
                pass  # what arrives goes on to the client at once: read freely (a slow response holds no slot)
            elif guard.may_read():
                self.reading = True
                guard.readers += 1
            else:  # the client's connection holds its budget already: read nothing yet
                conn.pause_reading()
                client.paused_up[self] = None

    def _client_window_open(self) -> bool:
        conn = self.client.conn
        stream = conn.streams.get(self.sid)
        if stream is None or stream.local_ended or conn.closed:
            return False  # local_flow_control_window would raise StreamClosedError (or ProtocolError: closed)
        return stream.send_window > 0 and conn.send_window > 0

    def resume(self) -> bool:
        """Read the upstream again (taking a reading slot), unless this stream holds half its own budget still.
        False: it stays paused."""
        conn = self.attempt.conn
        client = self.client
        guard = client.guard
        if conn is not None and self.queued_down >= guard.limits.buffer_limit_bytes // 2:
            return False
        del client.paused_up[self]
        if conn is not None:
            self.reading = True
            guard.readers += 1
            conn.resume_reading()
        return True

    def _leave(self) -> None:
        """Give back the reading slot (paused, or done) and let a waiting stream have it."""
        client = self.client
        client.paused_up.pop(self, None)
        if self.reading:
            self.reading = False
            client.guard.readers -= 1
            if client.paused_up and client.guard.may_read():
                wake_readers(client)

    def pending_bytes(self) -> int:
        return sum(map(len, self.pending))

    def close(self) -> None:
        """The stream finished: its reading slot goes back, and what was read and never sent leaves the budget."""
        self.stream = None  # no cycle left with the stream (freed by reference counting)
        self._leave()
        if self.pending:
            n = self.pending_bytes()
            self.pending.clear()
            self.queued_down -= n
            self.client.guard.buffered -= n


def wake_readers(client: H2Downstream) -> None:
    """The client connection's budget allows more upstream reads: resume paused streams, oldest first, while it
    does. A stream still holding half its own budget goes to the back (few can: they share the budget)."""
    paused = client.paused_up
    guard = client.guard
    skipped = 0
    while paused and skipped < len(paused) and guard.may_read():
        writer = next(iter(paused))
        if not writer.resume():
            del paused[writer]
            paused[writer] = None
            skipped += 1


def _status_bytes(status: int) -> bytes:
    found = _STATUS.get(status)
    if found is None:
        found = _STATUS[status] = str(status).encode()  # 3 digits (checked by each codec): the memo stays small
    return found


_STATUS: dict[int, bytes] = {}
