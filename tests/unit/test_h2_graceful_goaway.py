"""The GOAWAY the h2 server side writes beside h2 (h2_downstream.goaway_frame) for graceful shedding: a valid
frame for another parser (hyperframe) and for the proxy's own GOAWAY reader (h2_goaway.GoawaySplitter)."""

from __future__ import annotations

import hyperframe.frame
import pytest

from planemesh.agent.proxy.h2_downstream import REFUSAL_CODES, goaway_frame
from planemesh.agent.proxy.h2_goaway import GoawaySplitter
from planemesh.agent.proxy.limits import H1_REFUSALS

NO_ERROR, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x0, 0x7, 0xB


@pytest.mark.parametrize(("last", "code", "debug"), [(0, NO_ERROR, b""), (7, NO_ERROR, b"overloaded"),
                                                     ((1 << 31) - 1, ENHANCE_YOUR_CALM, b"x" * 100)])  # fmt: skip
def test_goaway_frame_parses(last: int, code: int, debug: bytes) -> None:
    raw = goaway_frame(last, code, debug)
    frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(raw[:9]))
    frame.parse_body(memoryview(raw[9 : 9 + length]))
    assert isinstance(frame, hyperframe.frame.GoAwayFrame) and len(raw) == 9 + length
    assert (frame.stream_id, frame.last_stream_id, frame.error_code, frame.additional_data) == (0, last, code, debug)
    assert GoawaySplitter().feed(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00" + raw) == (
        b"\x00\x00\x00\x04\x01\x00\x00\x00\x00",  # the SETTINGS ACK before it is passed on
        [(last, code)],
    )


def test_every_refusal_reason_has_an_answer_for_both_codecs() -> None:
    assert set(H1_REFUSALS) == {"memory", "connections", "source-connections"}
    for why, reply in H1_REFUSALS.items():
        assert reply.startswith(b"HTTP/1.1 503 ") and b"x-planemesh-overloaded: " + why.encode() in reply
    assert REFUSAL_CODES.get("source-connections") == ENHANCE_YOUR_CALM  # the client's own excess
    assert REFUSAL_CODES.get("memory", REFUSED_STREAM) == REFUSED_STREAM  # not its doing: retry later
