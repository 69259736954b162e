"""The proxy's HPACK pieces checked against hpack itself: the stateless encoder's output decoded by hpack's Decoder,
the memoising decoder decoding in lockstep with hpack's."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder, HPACKError, NeverIndexedHeaderTuple
from hypothesis import given
from hypothesis import strategies as st

from planemesh.agent.proxy.h2_hpack import StatelessEncoder, encode_field, encode_integer
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


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (b":status", b"200", b"\x88"),  # static table, indexed
        (b":method", b"GET", b"\x82"),
        (b"content-type", b"text/plain", b"\x0f\x10\x0atext/plain"),  # name 31 by index (4-bit prefix + 16)
        (b"x-custom", b"v", b"\x00\x08x-custom\x01v"),  # new name, without indexing
        (b"authorization", b"secret", b"\x1f\x08\x06secret"),  # never indexed (0001), name index 23
        (b"X-Upper", b"  padded\t", b"\x00\x07x-upper\x06padded"),  # lower-cased name, trimmed value
    ],
)
def test_encode_field(name: bytes, value: bytes, expected: bytes) -> None:
    assert encode_field(name, value) == expected


def test_round_trip_and_no_dynamic_table_use() -> None:
    enc, dec = StatelessEncoder(), Decoder()
    headers = [(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"content-length", b"6"), (b"etag", b'"x"')]
    for _ in range(3):  # the second and later blocks come from the memo: same bytes, same meaning
        assert dec.decode(enc.encode(headers), raw=True) == headers
    assert len(dec.header_table.dynamic_entries) == 0


def test_credentials_are_never_indexed_and_not_memoised() -> None:
    enc, dec = StatelessEncoder(), Decoder()
    out = dec.decode(enc.encode([(b"authorization", b"Bearer t"), (b"cookie", b"short=1")]), raw=True)
    assert all(isinstance(h, NeverIndexedHeaderTuple) for h in out)
    assert enc._memo == {}
    long_cookie = (b"cookie", b"c" * 40)
    dec.decode(enc.encode([long_cookie]), raw=True)
    assert long_cookie in enc._memo


def test_table_size_change_is_signalled_once() -> None:
    enc, dec = StatelessEncoder(), Decoder()
    enc.header_table_size = 0
    block = enc.encode([(b":status", b"204")])
    assert block == b"\x20\x89"  # size update to 0, then :status 204
    dec.decode(block)
    assert dec.header_table.maxsize == 0
    assert enc.encode([(b":status", b"204")]) == b"\x89"


_names = st.binary(min_size=1, max_size=40).map(lambda b: bytes(c % 26 + 97 for c in b))
_values = st.binary(max_size=300).map(lambda b: bytes(c % 94 + 33 for c in b))


@given(st.lists(st.tuples(_names, _values), max_size=20))
def test_any_fields_round_trip(headers: list[tuple[bytes, bytes]]) -> None:
    enc, dec = StatelessEncoder(), Decoder()
    for _ in range(2):
        assert dec.decode(enc.encode(headers), raw=True) == headers


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
