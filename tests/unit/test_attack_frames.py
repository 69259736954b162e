"""labs/h2_frames.py (the flood clients' frame builders and reader), checked against hyperframe and hpack."""

from __future__ import annotations

import hpack
import pytest
from hyperframe.frame import (
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from planemesh.labs import h2_frames as f
from planemesh.labs.attacks import ATTACKS, CONTROL_FRAMES, Outcome, run


def parse(data: bytes) -> list[Frame]:
    """Every frame in `data`, by hyperframe's parser (which rejects a malformed header or a short body)."""
    frames = []
    while data:
        fr, length = Frame.parse_frame_header(memoryview(data[:9]))
        assert len(data) >= 9 + length, "truncated frame"
        fr.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(fr)
        data = data[9 + length :]
    return frames


def test_client_preface_is_the_magic_then_settings() -> None:
    data = f.client_preface({f.SETTINGS_INITIAL_WINDOW_SIZE: 0, f.SETTINGS_MAX_CONCURRENT_STREAMS: 7})
    assert data.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    (settings,) = parse(data[len(f.PREFACE) :])
    assert isinstance(settings, SettingsFrame) and "ACK" not in settings.flags
    assert settings.settings == {SettingsFrame.INITIAL_WINDOW_SIZE: 0, SettingsFrame.MAX_CONCURRENT_STREAMS: 7}


def test_control_frames_parse_as_what_they_claim() -> None:
    ack, ping, wu, rst = parse(f.settings_ack() + f.ping(b"12345678") + f.window_update(3, 1) + f.rst_stream(5))
    assert isinstance(ack, SettingsFrame) and "ACK" in ack.flags and ack.settings == {}
    assert isinstance(ping, PingFrame) and ping.opaque_data == b"12345678" and "ACK" not in ping.flags
    assert isinstance(wu, WindowUpdateFrame) and (wu.stream_id, wu.window_increment) == (3, 1)
    assert isinstance(rst, RstStreamFrame) and (rst.stream_id, rst.error_code) == (5, f.CANCEL)


def test_every_control_flood_repeats_one_valid_frame() -> None:
    for kind, one in CONTROL_FRAMES.items():
        frames = parse(f.repeat(one, 3))
        assert len(frames) == 3 and all(fr.stream_id == 0 for fr in frames), kind


def test_rapid_reset_pairs_open_then_cancel_each_stream_with_a_decodable_block() -> None:
    blocks = f.RequestBlocks("198.18.1.3:80", "/x")
    frames = parse(f.pairs([1, 3, 5], blocks))
    assert [(type(fr).__name__, fr.stream_id) for fr in frames] == [
        ("HeadersFrame", 1), ("RstStreamFrame", 1), ("HeadersFrame", 3), ("RstStreamFrame", 3),
        ("HeadersFrame", 5), ("RstStreamFrame", 5),
    ]  # fmt: skip
    decoder = hpack.Decoder()  # one decoder for the connection: later blocks refer to the first one's entries
    expected = [(":method", "GET"), (":scheme", "http"), (":authority", "198.18.1.3:80"), (":path", "/x")]
    for fr in frames[::2]:
        assert isinstance(fr, HeadersFrame) and {"END_HEADERS", "END_STREAM"} <= fr.flags
        assert decoder.decode(fr.data) == expected
    assert len(frames[2].data) < len(frames[0].data)  # the repeats are indexed: a few bytes each


def test_headers_without_end_stream() -> None:
    (fr,) = parse(f.headers(7, f.RequestBlocks("a", "/").next(), end_stream=False))
    assert fr.flags == {"END_HEADERS"}


@pytest.mark.parametrize(
    "build",
    [
        lambda: f.ping(b"short"),
        lambda: f.window_update(0, 0),
        lambda: f.window_update(0, 1 << 31),
        lambda: f.rst_stream(1 << 31),
        lambda: f.frame(0, 0, 1, b"x" * (1 << 24)),
    ],
)
def test_out_of_range_values_are_refused(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        build()


def test_frame_reader_takes_any_split_and_reports_goaway_and_data() -> None:
    goaway = GoAwayFrame(0, last_stream_id=9, error_code=f.ENHANCE_YOUR_CALM).serialize()
    data = f.frame(f.DATA, 0, 1, b"z" * 300)
    stream = f.settings({f.SETTINGS_MAX_CONCURRENT_STREAMS: 100}) + data + f.rst_stream(1, f.REFUSED_STREAM) + goaway
    reader = f.FrameReader()
    seen = [fr for i in range(len(stream)) for fr in reader.feed(stream[i : i + 1])]  # one byte at a time
    assert [fr.kind for fr in seen] == [f.SETTINGS, f.DATA, f.RST_STREAM, f.GOAWAY]
    assert seen[1].payload == b"" and reader.data_bytes == 300  # DATA is counted, not kept
    assert seen[3].goaway_code() == f.ENHANCE_YOUR_CALM and seen[0].goaway_code() is None
    assert list(reader.feed(b"")) == []


def test_outcome_counts_closed_connections() -> None:
    out = Outcome("ping_flood", connections=2, closed_after_s=[0.5])
    assert out.closed == 1 and '"closed": 1' in out.to_json()


def test_unknown_attack_is_a_clear_error() -> None:
    assert "idle_flood" in ATTACKS
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        run("nope", "127.0.0.1", 1, 1.0, None, "/")
