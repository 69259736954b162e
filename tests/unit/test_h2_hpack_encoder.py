"""The proxy's HPACK encoder with the dynamic table (agent/proxy/h2_hpack.py), checked against RFC 7541's examples
and round-tripped through two decoders: hpack's (python-hyper, independent of ours) and our memoising one, which
must agree on every field and on the dynamic table after each block, across table-size changes and evictions."""

from __future__ import annotations

import hpack
from hpack import NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from planemesh.agent.proxy import h2_hpack
from planemesh.agent.proxy.h2_hpack import Encoder, NeverIndexed, encode_string, huffman
from planemesh.agent.proxy.h2_hpack_decode import MemoDecoder

GRPC_RESPONSE = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"server", b"nginx/1.22.1"),
    (b"date", b"Sun, 06 Dec 2026 07:30:00 GMT"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
]


class Peer:
    """Both decoders, fed the same blocks."""

    def __init__(self) -> None:
        self.theirs = hpack.Decoder()
        self.ours = MemoDecoder(1 << 16)

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        theirs = self.theirs.decode(block, raw=True)
        ours = self.ours.decode(block, raw=True)
        assert ours == theirs
        assert [isinstance(f, NeverIndexedHeaderTuple) for f in ours] == [
            isinstance(f, NeverIndexedHeaderTuple) for f in theirs
        ]
        return ours

    def table(self) -> list[tuple[bytes, bytes]]:
        theirs = [tuple(e) for e in self.theirs.header_table.dynamic_entries]
        assert list(self.ours.header_table.dynamic_entries) == theirs
        assert self.ours.header_table.maxsize == self.theirs.header_table.maxsize
        return theirs


def test_rfc_7541_c4_requests_with_huffman_coding() -> None:
    """Appendix C.4: three requests on one connection, byte for byte."""
    enc = Encoder()
    c41 = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")]
    assert enc.encode(c41).hex() == "828684418cf1e3c2e5f23a6ba0ab90f4ff"
    assert enc.encode([*c41, (b"cache-control", b"no-cache")]).hex() == "828684be5886a8eb10649cbf"
    c43 = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
           (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]  # fmt: skip
    assert enc.encode(c43).hex() == "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"
    assert enc.table() == [(b"custom-key", b"custom-value"), (b"cache-control", b"no-cache"),
                           (b":authority", b"www.example.com")]  # fmt: skip


def test_huffman_matches_hpack_and_is_used_only_when_shorter() -> None:
    coder = hpack.huffman.HuffmanEncoder(hpack.huffman_constants.REQUEST_CODES,
                                         hpack.huffman_constants.REQUEST_CODES_LENGTH)  # fmt: skip
    for text in (b"", b"a", b"www.example.com", bytes(range(256)), b"\xff" * 7):
        assert huffman(text) == coder.encode(text)
    assert encode_string(b"no-cache") == b"\x86" + huffman(b"no-cache")
    assert encode_string(b"\x00\x01") == b"\x02\x00\x01"  # Huffman would be longer: raw


def test_a_repeated_response_head_is_one_byte_per_field() -> None:
    enc, peer = Encoder(), Peer()
    first = enc.encode(GRPC_RESPONSE)
    assert peer.decode(first) == GRPC_RESPONSE
    second = enc.encode(GRPC_RESPONSE)
    assert second == bytes.fromhex("88c1c0bfbe")  # :status static, four entries of the dynamic table
    assert peer.decode(second) == GRPC_RESPONSE
    assert peer.table() == enc.table()
    trailers = [(b"grpc-status", b"0"), (b"grpc-message", b"")]
    assert peer.decode(enc.encode(trailers)) == trailers
    assert len(enc.encode(trailers)) == 2


def test_fields_given_as_lists_and_in_upper_case() -> None:
    enc, peer = Encoder(), Peer()
    for _ in range(2):
        assert peer.decode(enc.encode([[b"X-Upper", b"  padded\t"], (b":status", b"204")])) == [
            (b"x-upper", b"padded"), (b":status", b"204")]  # fmt: skip
    assert peer.table() == enc.table() == [(b"x-upper", b"padded")]


def test_credentials_are_never_indexed_nor_remembered() -> None:
    enc, peer = Encoder(), Peer()
    secrets = [(b"authorization", b"Bearer t"), (b"proxy-authorization", b"Basic x"), (b"cookie", b"short=1"),
               (b"set-cookie", b"id=42; HttpOnly"), NeverIndexed(b"x-token", b"abc")]  # fmt: skip
    for _ in range(2):
        out = peer.decode(enc.encode(secrets))
        assert out == secrets and all(isinstance(f, NeverIndexedHeaderTuple) for f in out)
    assert enc.table() == peer.table() == []
    assert not set(map(tuple, secrets)) & set(h2_hpack._plans)  # (other tests may remember b"abc" as another field)
    long_cookie = (b"cookie", b"c" * 40)  # as nghttp2: a cookie of 20 bytes or more is indexed
    peer.decode(enc.encode([long_cookie]))
    assert enc.table() == peer.table() == [long_cookie]


def test_a_field_once_indexed_comes_never_indexed_when_the_peer_sent_it_so() -> None:
    """What a peer sent never-indexed (our decoder's NeverIndexed) is not answered from the table nor from the
    connection's cache of known fields, though it equals a field that is in both."""
    enc, peer = Encoder(), Peer()
    for _ in range(2):
        peer.decode(enc.encode([(b"x-k", b"v"), (b":status", b"200")]))
    assert enc.encode([(b"x-k", b"v"), (b":status", b"200")]) == b"\xbe\x88"  # both known
    forwarded = MemoDecoder(1 << 16).decode(hpack.Encoder().encode([NeverIndexedHeaderTuple(b"x-k", b"v")]))
    assert type(forwarded[0]) is NeverIndexed
    out = peer.decode(enc.encode([*forwarded, (b":status", b"200")]))
    assert isinstance(out[0], NeverIndexedHeaderTuple) and out == [(b"x-k", b"v"), (b":status", b"200")]


def test_per_message_values_are_not_indexed() -> None:
    enc, peer = Encoder(), Peer()
    for i in range(3):
        fields = [(b":path", b"/r/%d" % i), (b"content-length", b"%d" % i), (b"x-request-id", b"id-%d" % i),
                  (b"traceparent", b"00-%032x-%016x-01" % (i, i)), (b"grpc-timeout", b"%dm" % i)]  # fmt: skip
        assert peer.decode(enc.encode(fields)) == fields
    assert enc.table() == peer.table() == []
    assert not any(field[0] in h2_hpack.PER_REQUEST for field in h2_hpack._plans)


def test_eviction_keeps_both_tables_equal() -> None:
    enc, peer = Encoder(), Peer()
    fields = [(b"x-field-%d" % i, b"v" * 100) for i in range(40)]  # 142 bytes each: 28 fit in 4,096
    for field in fields:
        peer.decode(enc.encode([field]))
    assert len(enc.table()) == 4096 // 142
    assert enc.table() == peer.table()
    assert enc.table()[-1] == fields[40 - 4096 // 142]
    evicted, kept = fields[0], fields[-1]
    assert enc.encode([kept]) == bytes((0x80 | 62,))
    assert peer.decode(enc.encode([evicted])) == [evicted]  # a literal again, indexed anew
    assert enc.table()[0] == evicted and enc.table() == peer.table()


def test_an_entry_over_three_quarters_of_the_table_is_not_indexed() -> None:
    enc, peer = Encoder(), Peer()
    peer.decode(enc.encode([(b"x-small", b"s")]))
    big = (b"x-big", b"b" * 3100)
    for _ in range(2):
        assert peer.decode(enc.encode([big])) == [big]
    assert enc.table() == peer.table() == [(b"x-small", b"s")]  # the small entry was not evicted by it


def test_table_size_changes_are_signalled_at_the_next_block() -> None:
    enc, peer = Encoder(), Peer()
    peer.decode(enc.encode(GRPC_RESPONSE))
    enc.header_table_size = 0  # the peer's SETTINGS_HEADER_TABLE_SIZE
    block = enc.encode(GRPC_RESPONSE)
    assert block[:1] == b"\x20"  # size update to 0 first
    assert peer.decode(block) == GRPC_RESPONSE
    assert enc.table() == peer.table() == []
    assert enc.encode([(b":status", b"204")]) == b"\x89"  # signalled once
    enc.header_table_size = 1 << 16  # more than we use: we keep MAX_TABLE_SIZE
    assert enc.header_table_size == h2_hpack.MAX_TABLE_SIZE
    assert enc.encode([(b":status", b"204")])[:3] == bytes.fromhex("3fe11f")  # 4,096
    enc.header_table_size = 1 << 16
    assert enc.encode([(b":status", b"204")]) == b"\x89"  # unchanged: nothing to signal


def test_a_shrink_and_grow_between_blocks_signals_the_smallest_then_the_final_size() -> None:
    """RFC 7541 4.2: the decoder must evict as the smaller size did, so both sizes are signalled."""
    enc, peer = Encoder(), Peer()
    peer.decode(enc.encode(GRPC_RESPONSE))
    enc.header_table_size = 100
    enc.header_table_size = 4096
    block = enc.encode(GRPC_RESPONSE)
    assert block.startswith(bytes.fromhex("3f45") + bytes.fromhex("3fe11f"))  # 100, then 4,096
    assert peer.decode(block) == GRPC_RESPONSE
    assert enc.table() == peer.table() and len(enc.table()) == 4


def test_a_smaller_table_evicts_at_once() -> None:
    enc, peer = Encoder(), Peer()
    peer.decode(enc.encode(GRPC_RESPONSE))
    enc.header_table_size = 110  # room for the newest entry only (grpc-accept-encoding, 73 bytes)
    assert enc.table() == [GRPC_RESPONSE[-1]]
    assert peer.decode(enc.encode(GRPC_RESPONSE)) == GRPC_RESPONSE
    assert enc.table() == peer.table()


_names = st.sampled_from([b"a", b"b", b"user-agent", b"content-type", b"x-y", b"cookie", b"date", b":path"])
_values = st.one_of(st.sampled_from([b"", b"1", b"22", b"text/html"]), st.binary(max_size=400))
_block = st.lists(st.tuples(_names, _values), max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_block, st.none() | st.integers(0, 5000)), min_size=1, max_size=20))
def test_any_blocks_and_size_changes_round_trip(steps: list[tuple[list[tuple[bytes, bytes]], int | None]]) -> None:
    """Random fields (any bytes in values), random SETTINGS_HEADER_TABLE_SIZE changes: every block decodes to its
    fields (normalised) in both decoders, and the three dynamic tables stay the same."""
    enc, peer = Encoder(), Peer()
    for fields, size in steps:
        if size is not None:
            enc.header_table_size = size
        expected = [(n, v.strip(b" \t")) for n, v in fields]
        for _ in range(2):  # the second time mostly from the connection's known fields
            assert peer.decode(enc.encode(fields)) == expected
            assert peer.table() == enc.table()


def test_names_of_dynamic_entries_are_referred_to() -> None:
    """A field whose name is in the dynamic table (not the static one) names that entry instead of spelling the
    name again (RFC 7541 6.2.1, indexed name); both decoders agree on every block and on the table."""
    enc, peer = Encoder(), Peer()
    first = [(b"grpc-status", b"0"), (b"x-envoy-like-name", b"one")]
    assert peer.decode(enc.encode(first)) == first
    again = [(b"grpc-status", b"14"), (b"x-envoy-like-name", b"two")]
    block = enc.encode(again)
    assert peer.decode(block) == again
    # each field: the entry's index (both 63 at their turn: the first's insertion moves the second's name) and
    # its value string; a spelt name would cost its length
    name_63 = h2_hpack.encode_integer(63, 6, 0x40)
    assert block == name_63 + encode_string(b"14") + name_63 + encode_string(b"two")
    assert peer.table() == enc.table() == [again[1], again[0], first[1], first[0]]
    assert peer.decode(enc.encode(again)) == again  # now indexed whole


def test_a_name_reference_to_the_entry_that_its_own_insertion_evicts() -> None:
    """RFC 7541 4.4: a new entry may name the entry that adding it evicts; the name is resolved first."""
    enc, peer = Encoder(), Peer()
    enc.header_table_size = 150  # room for one entry of this size (32 + 18 + 40 = 90 bytes; at most 3/4 of the
    # table is indexed); the next block starts with the size update that tells the decoders
    first = [(b"x-some-long-name-1", b"a" * 40)]
    assert peer.decode(enc.encode(first)) == first
    second = [(b"x-some-long-name-1", b"b" * 40)]
    block = enc.encode(second)
    assert block[0] == 0x40 | 62  # the name of the one entry, evicted by this insertion
    assert peer.decode(block) == second
    assert peer.table() == enc.table() == second


def test_name_references_stay_right_through_evictions() -> None:
    """Fields of a few names with changing values over a small table: every block decodes right in both
    decoders (the name map follows insertions and evictions)."""
    enc, peer = Encoder(), Peer()
    enc.header_table_size = 300
    for i in range(200):
        block = [(b"x-name-%d" % (i % 5), b"value-%d" % (i % 7)), (b"x-name-%d" % (i % 3), b"v%d" % i)]
        assert peer.decode(enc.encode(block)) == block
        assert peer.table() == enc.table()
