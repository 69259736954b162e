"""gRPC over HTTP/2 without I/O: the request headers, the 5-byte length-prefixed messages, and one call's response
(headers, messages, trailers or a reset) read into messages and a final status, as grpc-core's client reads them.

Why not grpcio: `import grpc` costs the agent ~19 MB of RSS and its threads, for one ADS stream and one unary
CreateCertificate call (issue #15, the DaemonSet case). xds/grpc_channel.py drives this over asyncio and h2.
The wire rules followed are gRPC's PROTOCOL-HTTP2.md and http-grpc-status-mapping.md.
"""

from __future__ import annotations

import enum
import struct
import urllib.parse
from collections.abc import Iterable, Sequence

PREFIX = struct.Struct(">BI")  # compressed flag, message length
DEFAULT_MAX_RECEIVE = 4 * 1024 * 1024  # grpc's default receive limit (the bootstrap sets the ADS one)


class StatusCode(enum.IntEnum):
    """gRPC status codes (the names grpc.StatusCode uses, so messages read the same)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """A call that ended with a status other than OK (grpc.aio.AioRpcError's `code()` and `details()`)."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Eof:
    def __repr__(self) -> str:
        return "EOF"


EOF = _Eof()  # read() after the server's last message of a call that ended OK (grpc.aio.EOF)

# http-grpc-status-mapping.md: an HTTP status other than 200 without grpc-status
_HTTP_STATUS = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}
# RST_STREAM error codes, as grpc-core maps them (PROTOCOL-HTTP2.md "Errors")
_RESET = {
    7: StatusCode.UNAVAILABLE,
    8: StatusCode.CANCELLED,
    11: StatusCode.RESOURCE_EXHAUSTED,
    12: StatusCode.PERMISSION_DENIED,
}


def encode_message(payload: bytes) -> bytes:
    """One uncompressed message as it goes in DATA frames."""
    return PREFIX.pack(0, len(payload)) + payload


def encode_timeout(seconds: float) -> str:
    """grpc-timeout: at most 8 digits and a unit (milliseconds here, seconds when it does not fit)."""
    millis = max(1, int(seconds * 1000))
    return f"{millis}m" if millis < 10**8 else f"{min(int(seconds), 10**8 - 1)}S"


def request_headers(
    authority: str,
    path: str,
    *,
    scheme: str = "http",
    metadata: Iterable[tuple[str, str]] = (),
    user_agent: str = "planemesh",
    timeout_s: float | None = None,
) -> list[tuple[str, str]]:
    """A call's HEADERS: pseudo-headers first, then gRPC's own, then the caller's metadata (lower-cased)."""
    headers = [
        (":method", "POST"),
        (":scheme", scheme),
        (":path", path),
        (":authority", authority),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        ("user-agent", user_agent),
    ]
    if timeout_s is not None:
        headers.append(("grpc-timeout", encode_timeout(timeout_s)))
    for key, value in metadata:
        key = key.lower()
        if key.startswith(":") or key in {"te", "content-type", "user-agent", "grpc-timeout"}:
            raise ValueError(f"metadata {key!r} is reserved by gRPC")
        headers.append((key, value))
    return headers


def decode_grpc_message(raw: str) -> str:
    """grpc-message is percent-encoded UTF-8; a malformed escape is kept as it is (grpc-core does the same)."""
    return urllib.parse.unquote(raw, errors="replace")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _fields(headers: Sequence[tuple[bytes | str, bytes | str]]) -> dict[str, str]:
    return {_text(k).lower(): _text(v) for k, v in headers}


class MessageReader:
    """DATA bytes -> whole messages: any split (one message over many frames, many messages in one frame)."""

    def __init__(self, max_receive: int = DEFAULT_MAX_RECEIVE) -> None:
        self.max_receive = max_receive
        self._buf = bytearray()
        self._need: int | None = None  # the current message's length, once its prefix is in

    def feed(self, data: bytes) -> list[bytes]:
        """The messages `data` completes; RpcError for a compressed or oversized one (the call is over then)."""
        self._buf += data
        out: list[bytes] = []
        while True:
            if self._need is None:
                if len(self._buf) < PREFIX.size:
                    return out
                flag, length = PREFIX.unpack_from(self._buf)
                if flag == 1:
                    raise RpcError(
                        StatusCode.INTERNAL, "compressed message received, but no compression was negotiated"
                    )
                if flag != 0:
                    raise RpcError(StatusCode.INTERNAL, f"invalid message flag {flag} (0 or 1)")
                if length > self.max_receive:
                    raise RpcError(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"Received message larger than max ({length} vs. {self.max_receive})",
                    )
                del self._buf[: PREFIX.size]
                self._need = length
            if len(self._buf) < self._need:
                return out
            out.append(bytes(self._buf[: self._need]))
            del self._buf[: self._need]
            self._need = None

    @property
    def pending(self) -> bool:
        return bool(self._buf) or self._need is not None


class ResponseReader:
    """One call's response: `headers()` then `data()` (messages) then `trailers()` (the final status), or a
    `reset()`. Each method raises RpcError when the response ends the call with an error."""

    def __init__(self, max_receive: int = DEFAULT_MAX_RECEIVE) -> None:
        self.messages = MessageReader(max_receive)
        self.got_headers = False

    def headers(self, headers: Sequence[tuple[bytes | str, bytes | str]], end_stream: bool = False) -> None:
        """The response HEADERS; with END_STREAM it is a trailers-only response (the status is in it)."""
        fields = _fields(headers)
        status = fields.get(":status", "")
        if status != "200" and "grpc-status" not in fields:
            code = _HTTP_STATUS.get(int(status) if status.isascii() and status.isdigit() else 0, StatusCode.UNKNOWN)
            raise RpcError(code, f"HTTP status {status or 'missing'} (not a gRPC response)")
        if end_stream:
            self.trailers(headers)
            return
        content_type = fields.get("content-type", "")
        if not content_type.startswith("application/grpc"):
            raise RpcError(StatusCode.UNKNOWN, f"content-type {content_type!r} is not application/grpc")
        if fields.get("grpc-encoding", "identity") != "identity":
            raise RpcError(StatusCode.INTERNAL, f"grpc-encoding {fields['grpc-encoding']} was not asked for")
        self.got_headers = True

    def data(self, data: bytes) -> list[bytes]:
        if not self.got_headers:
            raise RpcError(StatusCode.INTERNAL, "DATA before the response headers")
        return self.messages.feed(data)

    def trailers(self, headers: Sequence[tuple[bytes | str, bytes | str]]) -> None:
        """The final status: returns for OK, raises RpcError otherwise."""
        fields = _fields(headers)
        raw = fields.get("grpc-status")
        if raw is None:
            raise RpcError(StatusCode.UNKNOWN, "the response ended without grpc-status")
        try:
            code = StatusCode(int(raw))
        except ValueError:
            code = StatusCode.UNKNOWN
        if code is StatusCode.OK and self.messages.pending:
            raise RpcError(StatusCode.INTERNAL, "the response ended inside a message")
        if code is not StatusCode.OK:
            raise RpcError(code, decode_grpc_message(fields.get("grpc-message", "")))

    def ended_without_trailers(self) -> RpcError:
        return RpcError(StatusCode.INTERNAL, "the server ended the stream without trailers")

    @staticmethod
    def reset(error_code: int) -> RpcError:
        """RST_STREAM from the server."""
        code = _RESET.get(int(error_code), StatusCode.INTERNAL)
        return RpcError(code, f"stream reset by the server (HTTP/2 error {int(error_code)})")


def split_frames(buffer: bytearray, max_frame: int) -> list[bytes]:
    """The whole HTTP/2 frames at the start of `buffer`, removed from it (a partial frame stays), so that each is
    handed to h2 alone. A frame declared larger than `max_frame` goes out as it is: h2 refuses it at once
    rather than this buffering up to 16 MiB for it."""
    frames = []
    start = 0
    while len(buffer) - start >= 9:
        end = start + 9 + int.from_bytes(buffer[start : start + 3], "big")
        if end - start - 9 > max_frame:
            end = len(buffer)
        elif end > len(buffer):
            break
        frames.append(bytes(buffer[start:end]))
        start = end
    del buffer[:start]
    return frames


def parse_target(target: str) -> tuple[str, int] | str:
    """The bootstrap's target (xds/bootstrap.check_target): `unix:/p` or `unix:///p` -> the path; `host:port`,
    `[v6]:port` -> (host, port)."""
    if target.startswith("unix:"):
        path = target[len("unix:") :]
        return "/" + path.lstrip("/") if path.startswith("//") else path
    host, _, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit():
        raise ValueError(f"{target!r} is not host:port, [v6]:port or unix:///path")
    return host, int(port)


def authority(target: str) -> str:
    """:authority for a target (grpc sends `localhost` for unix sockets)."""
    return "localhost" if target.startswith("unix:") else target
