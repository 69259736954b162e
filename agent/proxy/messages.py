"""Codec-neutral messages: the request head the pipeline sends upstream, whatever the codecs on either side, and
the response head and the stream events a codec delivers (headers, data, trailers, end, reset), as
`typing.Protocol`s.

A RequestHead is what request_head.py decides (rewrites, route header changes, trace context, x-request-id,
x-forwarded-*); each upstream codec encodes it: `h1_request_bytes` for an HTTP/1.1 connection, `h2_request_fields`
for an h2 stream. Neither reads the other's framing back (before, the h2 upstream parsed the HTTP/1.1 head).

A ResponseHead is what either upstream codec makes of a response head: upstream.UpstreamConnection (HTTP/1.1)
and h2_upstream.H2ClientStream (an h2 stream) both hand one to the request's response.ResponseRelay, whatever the
client speaks: the hop-by-hop fields and framing are the codec's business, not the relay's.

StreamEvents is the shape of every per-stream callback set of the h2 codecs: they deliver a stream's events as
these (h2.H2Side -> h2_stream.Bridge for a client's request stream, h2_upstream.H2ClientStream for a response);
the HTTP/1.1 upstream codec's are the same events with a ResponseHead (contracts.ResponseSink).
"""

from __future__ import annotations

from typing import Any, Protocol

from planemesh.agent.proxy.http1 import CHUNKED, CRLF, HOP_BY_HOP, UPGRADE_CONNECTION, field_lines

Fields = list[tuple[bytes, bytes]]

# What an HTTP/1 request's fields carry that an h2 request must not (Host becomes :authority): the hop-by-hop
# fields (http1.HOP_BY_HOP). The framing is the head's own (length), re-emitted by each encoder.
H2_REQUEST_DROP = HOP_BY_HOP | {b"host"}


class RequestHead:
    """A request as it goes upstream: method, request-target, end-to-end fields (lower-case names, Host among
    them as the client or the route set it, nothing hop-by-hop), and the body's framing."""

    __slots__ = ("chunked", "fields", "length", "method", "target", "upgrade")

    def __init__(self, method: bytes, target: bytes, fields: Fields, length: int = 0, chunked: bool = False,
                 upgrade: bytes = b"") -> None:
        self.method = method
        self.target = target
        self.fields = fields
        self.length = length  # content-length of the body (0: none, or chunked)
        self.chunked = chunked  # a body of unknown length (HTTP/1.1 chunked; on h2, DATA until END_STREAM)
        self.upgrade = upgrade  # an HTTP/1.1 Upgrade the request asks for (a tunnel once answered 101)


class ResponseHead:
    """A response head as an upstream codec delivers it, whatever its protocol: status, end-to-end fields
    (lower-case names, nothing hop-by-hop, none a Connection header named), and how the body is delimited."""

    __slots__ = ("ended", "fields", "length", "reason", "reusable", "status", "until_close", "upgrade")

    def __init__(self, status: int, fields: Fields, length: int | None, until_close: bool = False,
                 reusable: bool = False, reason: bytes = b"", upgrade: bytes | None = None,
                 ended: bool = False) -> None:
        self.status = status
        self.fields = fields
        self.length = length  # the body's length when the upstream said it (content-length)
        self.until_close = until_close  # an HTTP/1.x body delimited by the connection's end
        self.reusable = reusable  # the upstream connection may carry another request afterwards
        self.reason = reason  # HTTP/1.x reason phrase (b"": the status' usual one)
        self.upgrade = upgrade  # a 101's protocol, when it really switches (Upgrade and Connection: upgrade)
        self.ended = ended  # nothing follows the head (an h2 HEADERS frame with END_STREAM)


def h1_request_bytes(head: RequestHead) -> bytes:
    """The HTTP/1.1 request head."""
    parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n", field_lines(head.fields)]
    if head.upgrade:
        parts += (UPGRADE_CONNECTION, b"upgrade: ", head.upgrade, CRLF)
    if head.chunked:
        parts.append(CHUNKED)
    elif head.length:
        parts.append(b"content-length: %d\r\n" % head.length)
    parts.append(CRLF)
    return b"".join(parts)


def h2_request_fields(head: RequestHead, default_authority: str | None, te_trailers: bool,
                      scheme: bytes = b"http") -> Fields:
    """The request as h2 fields: pseudo-headers first, Host as :authority (the upstream's address when the
    request has none: an HTTP/1.0 client without Host), hop-by-hop fields dropped, `te: trailers` kept when the
    client asked for trailers, content-length when the body has one. `scheme`: the client's (https when the
    proxy terminated its TLS), as Envoy sets :scheme."""
    authority = None
    fields = []
    for name, value in head.fields:
        if name == b"host":
            if authority is None:
                authority = value
        elif name not in H2_REQUEST_DROP:
            fields.append((name, value))
    if head.length and not head.chunked:
        fields.append((b"content-length", b"%d" % head.length))
    if te_trailers:
        fields.append((b"te", b"trailers"))
    target = head.target
    if target[:1] != b"/" and target != b"*":  # absolute form (a proxy request): h2 carries only the path
        rest = target.split(b"://", 1)[-1]
        slash = rest.find(b"/")
        if authority is None:
            authority = rest[:slash] if slash >= 0 else rest
        target = rest[slash:] if slash >= 0 else b"/"
    if authority is None:
        authority = (default_authority or "").encode("latin-1")
    pseudo = [(b":method", head.method), (b":scheme", scheme), (b":authority", authority), (b":path", target)]
    return pseudo + fields


class StreamEvents(Protocol):
    """One stream's events as an h2 codec delivers them (`side`: the connection they came on, which a receiver
    credits flow control to; `flow_len`: the DATA's length with padding)."""

    def on_data(self, side: Any, data: bytes, flow_len: int) -> None: ...
    def on_trailers(self, side: Any, trailers: Fields) -> None: ...
    def on_end(self, side: Any) -> None: ...
    def on_reset(self, side: Any, code: int) -> None: ...


class ResponseEvents(StreamEvents, Protocol):
    """A response stream's events: its head first (fields with :status), then StreamEvents."""

    def on_response_headers(self, headers: Fields, end: bool) -> None: ...
