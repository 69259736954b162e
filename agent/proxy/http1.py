"""HTTP/1.1 message pieces for the proxy, without I/O: header filtering, heads, chunk framing, local replies.

Header names are handled lower-case (as Envoy emits them); values are passed through untouched.
"""

from __future__ import annotations

from operator import itemgetter

from planemesh.agent.lazy_modules import load

# The one list of hop-by-hop fields, for the HTTP/1 path and the h2 codecs (h2_fields.py, h2_upstream.py, messages.py
# derive theirs from it): never forwarded. RFC 9110 7.6.1's connection options, plus the framing headers, which the
# proxy re-emits itself because it may re-frame a body (e.g. close-delimited upstream -> chunked downstream).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
# Fields a client's (or upstream's) Connection header cannot make hop-by-hop: Host routes the request
# (RFC 9112 3.2 requires it on every HTTP/1.1 request).
NEVER_HOP_BY_HOP = frozenset({b"host"})
# HTTP/2 frames bodies itself: content-length and trailer are end to end there, and te is allowed as
# "te: trailers" only (checked where h2 fields are built). What remains of HOP_BY_HOP is RFC 9113 8.2.2's
# connection-specific fields, which an h2 message must not carry (a peer would reject the stream).
H2_END_TO_END = frozenset({b"content-length", b"te", b"trailer"})
HOP_BY_HOP_H2 = HOP_BY_HOP - H2_END_TO_END

MAX_HEADER_BYTES = 64 * 1024  # larger header sections get 431
# Header fields per request or response head (and per trailer section): a request with more gets 431, a
# response 502. Envoy's max_headers_count default is 100 for both.
MAX_HEADERS_COUNT = 100
CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CHUNKED = b"transfer-encoding: chunked\r\n"
CONNECTION_CLOSE = b"connection: close\r\n"
KEEP_ALIVE_TOKEN = b"keep-alive"
KEEP_ALIVE_HEADER = b"connection: keep-alive\r\n"

# How a response body is delimited (upstream as received, downstream as re-emitted).
FRAME_NONE, FRAME_LENGTH, FRAME_CHUNKED, FRAME_CLOSE = 0, 1, 2, 3


# The phrases of the replies built at import (here, limits.py, downstream.py): http's HTTPStatus enum (~60 kB of
# RSS) loads with the first other phrase this worker makes up, not at start.
_BUILT_IN = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
             503: b"Service Unavailable", 505: b"HTTP Version Not Supported"}  # fmt: skip


def reason(status: int) -> bytes:
    if status in _BUILT_IN:
        return _BUILT_IN[status]
    try:
        return load("http").HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def status_line(status: int, phrase: bytes | None = None, http10: bool = False) -> bytes:
    """The status line, in HTTP/1.0 for a 1.0 client (as Envoy answers one)."""
    key = (status, phrase or b"")
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, phrase or reason(status))
        if len(_STATUS_LINES) < 512:  # phrases come from upstreams: keep the cache bounded
            _STATUS_LINES[key] = line
    return b"HTTP/1.0" + line[8:] if http10 else line


def connection_tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


_DROPPED: dict[tuple[bytes, ...], frozenset[bytes]] = {}


def dropped_names(connection_values: list[bytes]) -> frozenset[bytes]:
    """HOP_BY_HOP plus every header a Connection header names, except NEVER_HOP_BY_HOP (memoised: almost always
    "keep-alive"). The result is HOP_BY_HOP itself when nothing else is named."""
    key = tuple(connection_values)
    found = _DROPPED.get(key)
    if found is not None:
        return found
    names = {tok for value in connection_values for tok in connection_tokens(value)}
    names -= HOP_BY_HOP
    names -= NEVER_HOP_BY_HOP
    names.discard(b"close")
    found = HOP_BY_HOP | names if names else HOP_BY_HOP
    if len(_DROPPED) < 1024:  # values come from peers: keep the memo bounded
        _DROPPED[key] = found
    return found


_COLON = b": "
_name = itemgetter(0)


def field_lines(headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]) -> bytes:
    """`name: value\r\n` for every field, in C (no Python step per field: a head is built on every request)."""
    if not headers:
        return b""
    return CRLF.join(map(_COLON.join, headers)) + CRLF


def append_headers(parts: list[bytes], headers: list[tuple[bytes, bytes]], drop: frozenset[bytes]) -> None:
    if drop.isdisjoint(map(_name, headers)):  # the usual case (a codec's fields are end-to-end already)
        if headers:
            parts += (CRLF.join(map(_COLON.join, headers)), CRLF)  # field_lines, without a call
        return
    for name, value in headers:
        if name not in drop:
            parts += (name, b": ", value, CRLF)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


# Trailer fields never relayed: hop-by-hop and framing ones, and Host (RFC 9110 6.5.1: trailers must not route).
TRAILER_DROP = HOP_BY_HOP | {b"host"}


def last_chunk(trailers: list[tuple[bytes, bytes]] | None) -> bytes:
    """The end of a chunked body, carrying `trailers` (lower-case names) minus TRAILER_DROP."""
    if not trailers:
        return LAST_CHUNK
    parts = [b"0\r\n"]
    append_headers(parts, trailers, TRAILER_DROP)
    parts.append(CRLF)
    return b"".join(parts)


def parse_authority(target: bytes) -> tuple[str, int] | None:
    """A CONNECT request-target (`host:port`, `[v6]:port`) -> (host, port); None when it is not one."""
    host, sep, port = target.rpartition(b":")
    if not sep or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
        return None
    if host.startswith(b"[") and host.endswith(b"]"):
        host = host[1:-1]
        if not host or any(c not in _V6_CHARS for c in host):
            return None
    elif not host or any(c not in _HOST_CHARS for c in host):
        return None
    return host.decode("ascii").lower(), int(port)


_HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._")
_V6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")
CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
UPGRADE_CONNECTION = b"connection: upgrade\r\n"


def no_body_status(status: int) -> bool:
    return status < 200 or status == 204 or status == 304


def local_reply(
    status: int,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...] = (),
    *,
    close: bool = False,
    head_only: bool = False,
    http10: bool = False,
) -> bytes:
    """A complete response generated by the proxy itself (errors, redirects, direct responses)."""
    parts = [status_line(status, None, http10)]
    if body or not no_body_status(status):
        parts.append(b"content-length: %d\r\n" % len(body))
        if body:
            parts.append(b"content-type: text/plain\r\n")
    for name, value in headers:
        parts += (name, b": ", value, CRLF)
    if close:
        parts.append(CONNECTION_CLOSE)
    elif http10:
        parts.append(KEEP_ALIVE_HEADER)  # a 1.0 client assumes close unless told
    parts.append(CRLF)
    if body and not head_only:
        parts.append(body)
    return b"".join(parts)


# Replies sent before any request was understood: always close the connection.
BAD_REQUEST = local_reply(400, b"bad request\n", close=True)
HEADERS_TOO_LARGE = local_reply(431, b"request header fields too large\n", close=True)
VERSION_NOT_SUPPORTED = local_reply(505, b"HTTP version not supported\n", close=True)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
