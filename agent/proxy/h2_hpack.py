"""HPACK encoding for the proxy's h2 connections, without I/O (RFC 7541): a stateless encoder (the decoder is
h2_hpack_decode.py).

hpack's Encoder indexes every field into the dynamic table and Huffman-codes every literal: about a third of
the proxy's time per h2 request. This one never adds to the dynamic table and sends literals raw, so a
field's representation never depends on what went before and is memoised per (name, value): a response's
fields cost a dict lookup each. Fields in the static table are sent indexed, names in it by index. It does
what h2's outbound normalisation did (lower-case names, values without surrounding whitespace, credentials
never indexed), so that can be switched off.

The cost: larger header blocks than with a dynamic table (bytes on the wire, not CPU, is what the proxy has
to spare). The decoder's table size still follows SETTINGS_HEADER_TABLE_SIZE: a change is acknowledged with
a dynamic table size update at the start of the next block, as RFC 7541 4.2 requires.
"""

from __future__ import annotations

from hpack.table import HeaderTable

_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FIELDS.setdefault((_name, _value), _index)
    _STATIC_NAMES.setdefault(_name, _index)

SENSITIVE = frozenset({b"authorization", b"proxy-authorization"})  # plus short cookies, as nghttp2 and h2 do
MEMO_MAX = 4096  # memoised fields; the memo starts afresh when full (values come from peers)
MEMO_VALUE_MAX = 256  # longer values are encoded every time, and so are never-indexed fields (credentials)
# Fields whose value is new on every request: remembering them would only fill the memo (and so empty it).
PER_REQUEST = frozenset({
    b"x-request-id", b"traceparent", b"tracestate", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"b3",
    b"x-client-trace-id",
})  # fmt: skip


def encode_integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 5.1: `value` with an N-bit prefix, the prefix's byte starting with the bits in `first`."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    return encode_integer(len(data), 7, 0) + data  # H bit 0: raw octets


def encode_field(name: bytes, value: bytes) -> bytes:
    """One field: indexed when it is in the static table, else a literal without (or never) indexing."""
    name = name.lower()
    value = value.strip(b" \t")
    index = _STATIC_FIELDS.get((name, value))
    if index is not None:
        return encode_integer(index, 7, 0x80)
    never = name in SENSITIVE or (name == b"cookie" and len(value) < 20)
    first = 0x10 if never else 0x00  # 0001xxxx never indexed, 0000xxxx without indexing
    index = _STATIC_NAMES.get(name)
    if index is not None:
        return encode_integer(index, 4, first) + _string(value)
    return bytes((first,)) + _string(name) + _string(value)


class StatelessEncoder:
    """Drop-in for hpack.Encoder as h2 uses it: encode(headers) and a settable header_table_size."""

    __slots__ = ("_memo", "_size", "_size_update")

    def __init__(self) -> None:
        self._memo: dict[tuple[bytes, bytes], bytes] = {}
        self._size = HeaderTable.DEFAULT_SIZE
        self._size_update: bytes | None = None

    @property
    def header_table_size(self) -> int:
        return self._size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # Our table stays empty at any size; the update tells the decoder which size we now use.
        if value != self._size:
            self._size = value
            self._size_update = encode_integer(value, 5, 0x20)

    def encode(self, headers, huffman: bool = True) -> bytes:  # huffman: ignored, literals are sent raw
        memo = self._memo
        parts = []
        if self._size_update is not None:
            parts.append(self._size_update)
            self._size_update = None
        for field in headers:
            key = (field[0], field[1])  # fields may come as lists
            encoded = memo.get(key)
            if encoded is None:
                encoded = encode_field(key[0], key[1])
                if len(key[1]) <= MEMO_VALUE_MAX and encoded[0] >> 4 != 1 and key[0] not in PER_REQUEST:  # 0001: never
                    if len(memo) >= MEMO_MAX:
                        memo.clear()
                    memo[key] = encoded
            parts.append(encoded)
        return b"".join(parts)
