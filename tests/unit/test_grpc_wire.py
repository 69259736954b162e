"""gRPC framing without I/O (xds/grpc_wire.py): how DATA bytes split into messages, how a response's headers,
trailers and resets become a status, request headers, targets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planemesh.xds.grpc_wire import (
    EOF,
    MessageReader,
    ResponseReader,
    RpcError,
    StatusCode,
    authority,
    decode_grpc_message,
    encode_message,
    encode_timeout,
    parse_target,
    request_headers,
    split_frames,
)

A, B, C = b"first message", b"", b"x" * 70_000
WIRE = encode_message(A) + encode_message(B) + encode_message(C)
OK_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize(
    "chunks",
    [
        [WIRE],  # several messages in one DATA frame
        _chunks(WIRE, 1),  # every byte its own frame (the prefix split too)
        _chunks(WIRE, 3),
        _chunks(WIRE, 16_384),  # HTTP/2's default frame size: the large message spans frames
        [WIRE[:2], WIRE[2:20], WIRE[20:]],  # a split inside the first prefix, then inside the second message
    ],
    ids=["one-frame", "bytewise", "3-bytes", "16k-frames", "odd-splits"],
)
def test_messages_come_out_whole_whatever_the_split(chunks: list[bytes]) -> None:
    reader = MessageReader(max_receive=1 << 20)
    out = [m for chunk in chunks for m in reader.feed(chunk)]
    assert out == [A, B, C] and not reader.pending


@pytest.mark.parametrize(
    ("prefix", "code", "words"),
    [
        (b"\x01\x00\x00\x00\x03", StatusCode.INTERNAL, "compressed message received"),
        (b"\x07\x00\x00\x00\x03", StatusCode.INTERNAL, "invalid message flag 7"),
        (b"\x00\x00\x10\x00\x01", StatusCode.RESOURCE_EXHAUSTED, "larger than max (1048577 vs. 1048576)"),
    ],
    ids=["compressed", "bad-flag", "oversize"],
)
def test_bad_prefixes_end_the_call_with_a_clear_status(prefix: bytes, code: StatusCode, words: str) -> None:
    reader = MessageReader(max_receive=1 << 20)
    with pytest.raises(RpcError) as err:
        reader.feed(prefix + b"abc")
    assert err.value.code() is code and words in err.value.details()


def test_the_limit_is_checked_on_the_prefix_before_the_body_is_buffered() -> None:
    reader = MessageReader(max_receive=10)
    assert reader.feed(encode_message(b"0123456789")) == [b"0123456789"]  # exactly the limit passes
    with pytest.raises(RpcError, match=r"11 vs\. 10"):
        reader.feed(encode_message(b"x" * 11)[:5])  # the prefix alone is enough to refuse


def test_a_response_reads_headers_messages_trailers() -> None:
    r = ResponseReader()
    r.headers(OK_HEADERS)
    assert r.data(encode_message(b"a")[:3]) == []
    assert r.data(encode_message(b"a")[3:] + encode_message(b"b")) == [b"a", b"b"]
    r.trailers([(b"grpc-status", b"0")])  # OK: returns


@pytest.mark.parametrize(
    ("headers", "code", "details"),
    [
        # trailers-only: the status in the response HEADERS with END_STREAM, percent-encoded message
        (
            [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"16"),
             (b"grpc-message", b"authentication failed: no %E2%9C%93 token%25")],
            StatusCode.UNAUTHENTICATED,
            "authentication failed: no \u2713 token%",
        ),
        ([(b":status", b"200"), (b"grpc-status", b"8"), (b"grpc-message", b"too%20big")],
         StatusCode.RESOURCE_EXHAUSTED, "too big"),
        ([(b":status", b"200"), (b"grpc-status", b"99")], StatusCode.UNKNOWN, ""),  # unknown code
        ([(b":status", b"200"), (b"grpc-status", b"14"), (b"grpc-message", b"bad %zz escape")],
         StatusCode.UNAVAILABLE, "bad %zz escape"),
    ],
    ids=["unauthenticated", "exhausted", "unknown-code", "bad-escape"],
)  # fmt: skip
def test_trailers_only_responses_carry_the_status(headers: list, code: StatusCode, details: str) -> None:
    with pytest.raises(RpcError) as err:
        ResponseReader().headers(headers, end_stream=True)
    assert err.value.code() is code and err.value.details() == details


def test_a_trailers_only_ok_response_is_an_ok_end() -> None:
    ResponseReader().headers([(b":status", b"200"), (b"grpc-status", b"0")], end_stream=True)


@pytest.mark.parametrize(
    ("headers", "code", "words"),
    [
        ([(b":status", b"503")], StatusCode.UNAVAILABLE, "HTTP status 503"),  # a proxy in front, no gRPC
        ([(b":status", b"404"), (b"content-type", b"text/html")], StatusCode.UNIMPLEMENTED, "HTTP status 404"),
        ([(b":status", b"401")], StatusCode.UNAUTHENTICATED, "401"),
        ([(b":status", b"418")], StatusCode.UNKNOWN, "418"),
        ([(b":status", "²".encode())], StatusCode.UNKNOWN, "HTTP status ²"),  # a digit to str.isdigit, not to int
        ([(b":status", b"200"), (b"content-type", b"text/plain")], StatusCode.UNKNOWN, "not application/grpc"),
        ([*OK_HEADERS, (b"grpc-encoding", b"gzip")], StatusCode.INTERNAL, "grpc-encoding gzip"),
    ],
)
def test_responses_that_are_not_grpc_are_named(headers: list, code: StatusCode, words: str) -> None:
    with pytest.raises(RpcError) as err:
        ResponseReader().headers(headers)
    assert err.value.code() is code and words in err.value.details()


def test_trailers_without_status_or_ending_inside_a_message_are_errors() -> None:
    r = ResponseReader()
    r.headers(OK_HEADERS)
    with pytest.raises(RpcError, match="without grpc-status") as err:
        r.trailers([(b"x-other", b"1")])
    assert err.value.code() is StatusCode.UNKNOWN
    r = ResponseReader()
    r.headers(OK_HEADERS)
    r.data(encode_message(b"abcdef")[:7])
    with pytest.raises(RpcError, match="inside a message"):
        r.trailers([(b"grpc-status", b"0")])
    with pytest.raises(RpcError, match="DATA before"):
        ResponseReader().data(b"\x00")


@pytest.mark.parametrize(
    ("error_code", "code"),
    [(7, StatusCode.UNAVAILABLE), (8, StatusCode.CANCELLED), (11, StatusCode.RESOURCE_EXHAUSTED),
     (12, StatusCode.PERMISSION_DENIED), (0, StatusCode.INTERNAL), (2, StatusCode.INTERNAL)],
)  # fmt: skip
def test_stream_resets_map_as_grpc_core_maps_them(error_code: int, code: StatusCode) -> None:
    err = ResponseReader.reset(error_code)
    assert err.code() is code and f"HTTP/2 error {error_code}" in err.details()


def test_request_headers_pseudo_first_metadata_last_reserved_refused() -> None:
    headers = request_headers("xds.test", "/pkg.S/M", scheme="https", metadata=[("Authorization", "Bearer t")],
                              timeout_s=10)  # fmt: skip
    assert headers[:4] == [(":method", "POST"), (":scheme", "https"), (":path", "/pkg.S/M"), (":authority", "xds.test")]
    assert ("te", "trailers") in headers and ("content-type", "application/grpc") in headers
    assert ("grpc-timeout", "10000m") in headers and headers[-1] == ("authorization", "Bearer t")
    with pytest.raises(ValueError, match="reserved"):
        request_headers("a", "/p", metadata=[("te", "x")])


def test_timeouts_fit_eight_digits() -> None:
    assert encode_timeout(0.0001) == "1m" and encode_timeout(2.5) == "2500m"
    assert encode_timeout(10**6) == "1000000S"


@pytest.mark.parametrize(
    ("target", "where", "auth"),
    [
        ("unix:///run/xds.sock", "/run/xds.sock", "localhost"),
        ("unix:/run/xds.sock", "/run/xds.sock", "localhost"),
        ("127.0.0.1:15010", ("127.0.0.1", 15010), "127.0.0.1:15010"),
        ("[::1]:15012", ("::1", 15012), "[::1]:15012"),
        ("istiod.istio-system.svc:15012", ("istiod.istio-system.svc", 15012), "istiod.istio-system.svc:15012"),
    ],
)
def test_targets_as_the_bootstrap_writes_them(target: str, where: object, auth: str) -> None:
    assert parse_target(target) == where and authority(target) == auth


def test_a_target_without_port_is_refused() -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_target("istiod")


def test_errors_read_like_grpcs() -> None:
    err = RpcError(StatusCode.UNAVAILABLE, "gone")
    assert str(err) == "UNAVAILABLE: gone" and err.code().name == "UNAVAILABLE" and repr(EOF) == "EOF"
    assert decode_grpc_message("a%20b%") == "a b%"


def _frame(length: int, fill: bytes = b"p") -> bytes:
    return length.to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + fill * length


def test_frames_are_split_whole_and_a_partial_one_waits() -> None:
    a, b, c = _frame(0), _frame(5), _frame(20)
    buf = bytearray(a + b + c[:12])
    assert split_frames(buf, 16_384) == [a, b] and bytes(buf) == c[:12]
    buf += c[12:] + a[:3]
    assert split_frames(buf, 16_384) == [c] and bytes(buf) == a[:3]


def test_a_frame_declared_over_the_limit_is_handed_on_at_once() -> None:
    buf = bytearray(_frame(5) + _frame(100_000)[:50])  # h2 refuses it from its header: nothing is buffered for it
    assert split_frames(buf, 16_384) == [_frame(5), _frame(100_000)[:50]] and buf == bytearray()


_header = st.tuples(st.sampled_from([b":status", b"content-type", b"grpc-status", b"grpc-message", b"grpc-encoding",
                                     b"x"]), st.binary(max_size=12))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    head=st.lists(_header, max_size=5),
    end_stream=st.booleans(),
    chunks=st.lists(st.binary(max_size=40), max_size=6),
    trailers=st.lists(_header, max_size=4),
)
def test_any_response_ends_in_messages_ok_or_an_rpc_error_never_another_exception(head, end_stream, chunks, trailers):
    r = ResponseReader(max_receive=64)
    try:
        r.headers(head, end_stream=end_stream)
        for chunk in chunks:
            assert all(len(m) <= 64 for m in r.data(chunk))
        r.trailers(trailers)
    except RpcError as exc:
        assert exc.code() is not StatusCode.OK and isinstance(exc.details(), str)
