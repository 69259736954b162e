"""GOAWAY frames taken out of an inbound h2 byte stream before h2 sees them, without I/O.

The proxy itself no longer needs it (its codec, h2_codec.py, reports a GOAWAY and goes on taking frames); test
clients built on the h2 library do (tests/proxy/test_h2_admission.py).

h2 closes its connection state machine on a GOAWAY and then rejects every further frame
(python-hyper/h2#1181), yet RFC 9113 6.8 lets the streams up to the GOAWAY's last stream id complete: nginx
sends a GOAWAY after `keepalive_requests` (1000) streams and goes on answering the ones it accepted. The
upstream side of the proxy therefore finds frame boundaries itself, hands h2 everything but GOAWAY frames and
reports those as (last stream id, error code). Partial frame headers are held until complete (h2 would only
buffer them too).
"""

from __future__ import annotations

FRAME_HEADER = 9
GOAWAY = 0x7


class GoawaySplitter:
    __slots__ = ("_goaway", "_head", "_remaining")

    def __init__(self) -> None:
        self._head = b""  # an incomplete frame header, held back
        self._remaining = 0  # payload bytes of the current frame still to come
        self._goaway: bytearray | None = None  # the payload of a GOAWAY being collected

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int]]]:
        """(the bytes for h2, the GOAWAYs completed in `data`)."""
        if self._head:
            data = self._head + data
            self._head = b""
        keep: list[tuple[int, int]] = []  # ranges of `data` that go to h2
        goaways: list[tuple[int, int]] = []
        run = None if self._goaway is not None else 0  # start of the range being passed on; None: in a GOAWAY
        i, n = 0, len(data)
        while i < n:
            if self._remaining:  # inside a frame's payload
                take = min(self._remaining, n - i)
                if self._goaway is not None and len(self._goaway) < 8:  # the debug data is not kept
                    self._goaway += data[i : i + min(take, 8 - len(self._goaway))]
                self._remaining -= take
                i += take
                if not self._remaining and self._goaway is not None:
                    goaways.append(_parse(self._goaway))
                    self._goaway = None
                    run = i
                continue
            if n - i < FRAME_HEADER:
                self._head = data[i:]
                break
            self._remaining = int.from_bytes(data[i : i + 3], "big")
            if data[i + 3] == GOAWAY:
                if run is not None and i > run:
                    keep.append((run, i))
                run = None
                self._goaway = bytearray()
            i += FRAME_HEADER
            if not self._remaining and self._goaway is not None:  # no payload: malformed, reported as such
                goaways.append(_parse(self._goaway))
                self._goaway = None
                run = i
        if run is not None and i > run:
            keep.append((run, i))
        if keep == [(0, n)]:
            return data, goaways
        return b"".join(data[a:b] for a, b in keep), goaways


def _parse(payload: bytearray) -> tuple[int, int]:
    if len(payload) < 8:
        return 0, 1  # PROTOCOL_ERROR: nothing can be assumed processed
    return int.from_bytes(payload[0:4], "big") & 0x7FFFFFFF, int.from_bytes(payload[4:8], "big")
