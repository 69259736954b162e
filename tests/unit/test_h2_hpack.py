"""The proxy's HPACK decoder checked against hpack itself: the memoising decoder decoding in lockstep with hpack's
(the encoder: test_h2_hpack_encoder.py)."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder, HPACKError, NeverIndexedHeaderTuple
from hypothesis import given
from hypothesis import strategies as st

from planemesh.agent.proxy.h2_hpack import NeverIndexed, encode_integer
from planemesh.agent.proxy.h2_hpack_decode import MemoDecoder


@pytest.mark.parametrize(
    ("value", "prefix", "first", "expected"),
    [
        (10, 5, 0, b"\x0a"),  # RFC 7541 C.1.1
        (1337, 5, 0, b"\x1f\x9a\x0a"),  # C.1.2
        (42, 8, 0, b"\x2a"),  # C.1.3
        (2, 7, 0x80, b"\x82"),  # indexed field 2 (:method GET)
        (127, 7, 0, b"\x7f\x00"),  # exactly the prefix's maximum needs a zero continuation
    ],
)
def test_encode_integer(value: int, prefix: int, first: int, expected: bytes) -> None:
    assert encode_integer(value, prefix, first) == expected


def test_memo_decoder_hits_repeated_indexed_blocks() -> None:
    enc, dec = Encoder(), MemoDecoder(65536)
    request = [(b":method", b"GET"), (b":path", b"/x"), (b"user-agent", b"h2load")]
    first = enc.encode(request)
    second = enc.encode(request)  # all indexed now: leaves the table as it is
    assert dec.decode(first, raw=True) == request
    assert dec._memo == {}  # the first block added to the table: not remembered
    assert dec.decode(second, raw=True) == request
    assert second in dec._memo
    again = dec.decode(second, raw=True)
    assert again == request and again is not dec._memo[second]


_fields = st.lists(st.tuples(st.sampled_from([b"a", b"b", b"user-agent", b"x-y"]), st.sampled_from([b"1", b"22", b""])))


@given(st.lists(_fields, min_size=1, max_size=12), st.lists(st.integers(0, 4096), max_size=3))
def test_memo_decoder_agrees_with_hpack(blocks: list[list[tuple[bytes, bytes]]], sizes: list[int]) -> None:
    """Whatever the dynamic table does (inserts, evictions, resizes), the memo never answers stale."""
    enc, plain, memo = Encoder(), Decoder(), MemoDecoder(65536)
    for i, headers in enumerate(blocks * 2):
        if sizes and i % 5 == 4:
            enc.header_table_size = sizes[i % len(sizes)]
        block = enc.encode(headers)
        assert memo.decode(block, raw=True) == plain.decode(block, raw=True) == headers


@given(st.binary(max_size=200))
def test_memo_decoder_raises_only_hpack_errors_on_garbage(data: bytes) -> None:
    """Bytes from a peer: fields, or an HPACK error (the codec's COMPRESSION_ERROR), never another exception; and
    where hpack's own decoder accepts a block, the same fields."""
    try:
        ours = MemoDecoder(65536).decode(data, raw=True)
    except HPACKError:
        return
    assert ours == Decoder().decode(data, raw=True)


def test_huffman_strings_are_decoded_once() -> None:
    enc, dec = Encoder(), MemoDecoder(65536)
    for i in range(3):  # a new date each time: the block differs, the server's value is Huffman-decoded once
        block = enc.encode([(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"date", b"Sun %d" % i)])
        assert dec.decode(block, raw=True)[2] == (b"date", b"Sun %d" % i)
    assert list(dec._huffman.values()).count(b"nginx/1.22.1") == 1


def test_a_block_that_indexes_its_fields_again_each_time_is_replayed_from_the_memo() -> None:
    """nginx sends the same response block each time, adding its fields to the table again (literals with
    incremental indexing, names from the static table): remembered with the entries it adds, which are replayed,
    so the table ends as hpack's does."""
    block = (
        bytes.fromhex("88") + b"\x76\x05nginx" + b"\x61\x1dSun, 06 Dec 2026 04:50:00 GMT"
    )  # :status 200, server, date
    ours, plain = MemoDecoder(65536), Decoder()
    for _ in range(3):
        assert ours.decode(block, raw=True) == plain.decode(block, raw=True)
    assert block in ours._stable
    assert list(ours.header_table.dynamic_entries) == [tuple(e) for e in plain.header_table.dynamic_entries]
    indexed = bytes.fromhex("be")  # index 62: the newest entry (date)
    assert (
        ours.decode(indexed, raw=True)
        == plain.decode(indexed, raw=True)
        == [(b"date", b"Sun, 06 Dec 2026 04:50:00 GMT")]
    )


def test_never_indexed_literals_are_decoded_as_such() -> None:
    """RFC 7541 7.1.3: an intermediary forwards a never-indexed field never-indexed; the type carries it."""
    block = Encoder().encode([NeverIndexedHeaderTuple(b"x-secret", b"s3cret"), (b"x-plain", b"p")])
    first, second = MemoDecoder(65536).decode(block, raw=True)
    assert type(first) is NeverIndexed and first == (b"x-secret", b"s3cret")
    assert not isinstance(second, NeverIndexedHeaderTuple)
