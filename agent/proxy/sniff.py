"""Protocol sniffing: a pure classifier over the first bytes a client sent on an undeclared port.

    verdict = classify(peeked)               # None: undecided, peek again when more bytes arrive
    verdict = classify(peeked, final=True)   # timeout or client FIN: always decides

No I/O here: the sniffing listener (passthrough.py) peeks with MSG_PEEK and calls this until it decides.
Every parse is bounded by MAX_PEEK and never raises on garbage.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

MAX_PEEK = 16384 + 5  # one full TLS record; longer HTTP request lines than this are treated as opaque
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_REQUEST_LINE = 8192
# RFC 9110 methods and the WebDAV ones seen in practice; anything else is not worth an L7 path.
HTTP_METHODS = frozenset(
    {
        b"GET",
        b"HEAD",
        b"POST",
        b"PUT",
        b"DELETE",
        b"CONNECT",
        b"OPTIONS",
        b"TRACE",
        b"PATCH",
        b"PROPFIND",
        b"PROPPATCH",
        b"MKCOL",
        b"COPY",
        b"MOVE",
        b"LOCK",
        b"UNLOCK",
        b"REPORT",
        b"SEARCH",
    }
)
_MAX_METHOD = max(map(len, HTTP_METHODS))


class Kind(StrEnum):
    HTTP1 = "http1"
    H2 = "h2"
    TLS = "tls"
    OPAQUE = "opaque"


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Kind
    sni: str | None = None  # TLS only: server_name from the ClientHello
    alpn: tuple[str, ...] = ()  # TLS only: protocols the client offered


OPAQUE = Verdict(Kind.OPAQUE)
HTTP1 = Verdict(Kind.HTTP1)
H2 = Verdict(Kind.H2)


def classify(data: bytes, *, final: bool = False) -> Verdict | None:
    """The protocol of a connection whose client sent `data` first; None while more bytes could change it.
    `final` (timeout, FIN, or the peek buffer is full) forces a decision: undecided means opaque."""
    if not data:
        return OPAQUE if final else None
    data = data[:MAX_PEEK]
    for check in (_h2, _http1, _tls):
        verdict = check(data)
        if verdict is not None:
            return verdict or (OPAQUE if final or len(data) >= MAX_PEEK else None)
    return OPAQUE


# Each check returns a Verdict (decided), False (could still be this protocol: need more) or None (not it).


def _h2(data: bytes) -> Verdict | bool | None:
    n = min(len(data), len(H2_PREFACE))
    if data[:n] != H2_PREFACE[:n]:
        return None
    return H2 if n == len(H2_PREFACE) else False


def _http1(data: bytes) -> Verdict | bool | None:
    space = data.find(b" ", 0, _MAX_METHOD + 1)
    if space < 0:
        head = data[:_MAX_METHOD]
        if len(data) <= _MAX_METHOD and any(m.startswith(head) for m in HTTP_METHODS):
            return False
        return None
    if data[:space] not in HTTP_METHODS:
        return None
    eol = data.find(b"\n", space, MAX_REQUEST_LINE)
    if eol < 0:
        if len(data) >= MAX_REQUEST_LINE or b"\r" in data[space : len(data) - 1]:
            return None
        return False
    line = data[space + 1 : eol]
    line = line[:-1] if line.endswith(b"\r") else line
    if b"\r" in line:  # a bare CR: not HTTP, however the bytes arrived (the partial check above says so too)
        return None
    target, _, version = line.rpartition(b" ")
    if target and version in (b"HTTP/1.1", b"HTTP/1.0"):
        return HTTP1
    return None


def _tls(data: bytes) -> Verdict | bool | None:
    """A TLS handshake record holding a ClientHello (RFC 8446 4.1.2). Needs the record header and the
    whole record (bounded by the 16 KiB record limit) to read SNI and ALPN."""
    if data[0] != 0x16:
        return None
    if len(data) < 6:
        return False if _tls_header_prefix_ok(data) else None
    if data[1] != 0x03 or data[2] > 0x04 or data[5] != 0x01:
        return None
    record_len = int.from_bytes(data[3:5], "big")
    if record_len == 0 or record_len > 16384 + 2048:
        return None
    if len(data) < 5 + record_len:
        return False
    sni, alpn = parse_client_hello(data[5 : 5 + record_len])
    return Verdict(Kind.TLS, sni, alpn)


def _tls_header_prefix_ok(data: bytes) -> bool:
    return (len(data) < 2 or data[1] == 0x03) and (len(data) < 3 or data[2] <= 0x04)


class _Reader:
    """Bounds-checked big-endian reads; running past the end raises ValueError (caught by the parser)."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else min(end, len(data))

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise ValueError("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, len_bytes: int) -> _Reader:
        n = self.uint(len_bytes)
        sub = _Reader(self.data, self.pos, self.pos + n)
        self.take(n)
        return sub

    def left(self) -> int:
        return self.end - self.pos

    def take_all(self) -> bytes:
        return self.take(self.left())


def parse_client_hello(handshake: bytes) -> tuple[str | None, tuple[str, ...]]:
    """(SNI, ALPN protocols) of a ClientHello handshake message; what cannot be read stays empty.
    A ClientHello spread over several records is read as far as the first record goes."""
    sni: str | None = None
    alpn: list[str] = []
    try:
        r = _Reader(handshake)
        if r.uint(1) != 1:
            return None, ()
        r = _Reader(handshake, 4, 4 + int.from_bytes(handshake[1:4], "big"))
        r.take(2 + 32)  # legacy_version, random
        r.vector(1)  # legacy_session_id
        r.vector(2)  # cipher_suites
        r.vector(1)  # compression_methods
        if r.left() == 0:
            return None, ()
        extensions = r.vector(2)
        while extensions.left() >= 4:
            ext_type = extensions.uint(2)
            body = extensions.vector(2)
            if ext_type == 0:  # server_name
                names = body.vector(2)
                while names.left() >= 3:
                    name_type = names.uint(1)
                    name = names.vector(2)
                    if name_type == 0 and sni is None:
                        raw = name.take_all()
                        sni = raw.decode("ascii", "replace").lower()[:253] if raw else None
            elif ext_type == 16:  # application_layer_protocol_negotiation
                protos = body.vector(2)
                while protos.left() >= 1 and len(alpn) < 16:
                    alpn.append(protos.vector(1).take_all().decode("ascii", "replace"))
    except ValueError:
        pass  # truncated or malformed: keep what was read
    return sni, tuple(alpn)
