"""GoawaySplitter: GOAWAY frames taken out of an h2 byte stream fed in arbitrary pieces; the rest unchanged."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from planemesh.agent.proxy.h2_goaway import GoawaySplitter


def frame(kind: int, payload: bytes, stream: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def goaway(last: int, code: int = 0, debug: bytes = b"") -> bytes:
    return frame(7, struct.pack(">II", last, code) + debug)


HEADERS = frame(1, b"\x88", stream=1, flags=5)
DATA = frame(0, b"x" * 300, stream=1, flags=1)
SETTINGS = frame(4, b"")


def test_whole_frames() -> None:
    out, goaways = GoawaySplitter().feed(SETTINGS + HEADERS + goaway(1999, 0, b"bye") + DATA)
    assert out == SETTINGS + HEADERS + DATA
    assert goaways == [(1999, 0)]


def test_no_goaway_passes_the_same_object() -> None:
    data = SETTINGS + HEADERS + DATA
    out, goaways = GoawaySplitter().feed(data)
    assert out is data and goaways == []


def test_short_goaway_is_reported_as_nothing_processed() -> None:
    assert GoawaySplitter().feed(frame(7, b"\x00\x01") + DATA) == (DATA, [(0, 1)])
    assert GoawaySplitter().feed(frame(7, b"") + DATA) == (DATA, [(0, 1)])


@given(st.lists(st.sampled_from(["headers", "data", "settings", "goaway"]), max_size=12), st.data())
def test_any_split(kinds: list[str], draw: st.DataObject) -> None:
    frames = {"headers": HEADERS, "data": DATA, "settings": SETTINGS}
    stream, expected, expected_goaways = b"", b"", []
    for i, kind in enumerate(kinds):
        if kind == "goaway":
            stream += goaway(2 * i + 1, i % 3, b"d" * (i % 4))
            expected_goaways.append((2 * i + 1, i % 3))
        else:
            stream += frames[kind]
            expected += frames[kind]
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    splitter, out, goaways = GoawaySplitter(), b"", []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        piece, found = splitter.feed(stream[a:b])
        out += piece
        goaways += found
    assert out == expected
    assert goaways == expected_goaways
