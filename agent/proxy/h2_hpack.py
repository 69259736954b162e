"""HPACK encoding for the proxy's h2 connections, without I/O (RFC 7541): an encoder with the dynamic table (the
decoder is h2_hpack_decode.py). One per connection and direction (responses to a client, requests to an h2c
upstream).

A field is sent indexed when it is in the static table or in our dynamic table; else as a literal that adds it to
the dynamic table (so the next response's same field is one byte), unless it should not be indexed: credentials
(never indexed, 0001: authorization, proxy-authorization, set-cookie, cookies under 20 bytes, and any field a
peer sent us never-indexed, RFC 7541 7.1.3), fields whose value is new on nearly every message (nghttp2's list:
:path, content-length, etag, location...; and ids and trace context) and entries over 3/4 of the table
(nghttp2's rule; they would evict everything else). A name is referred to by index when the static table or
ours has it (the newest entry of that name), else spelt.

CPU is what the proxy has least of, so the representation of a field (its literal, Huffman-coded when shorter)
is computed once per process and remembered per (name, value) in a bounded memo; per connection the encoder keeps
which fields its table holds and, until the table next changes, each known field's bytes, so that a head like
the last ones is one C-level dict pass. Fields whose value is new each time are sent raw (no Huffman: the bit
loop costs more than the bytes it saves). A field a peer sent never-indexed must come as NeverIndexed (what
h2_hpack_decode makes): it hashes apart from its plain twin, which the per-connection cache may hold.

The table's size follows the peer's SETTINGS_HEADER_TABLE_SIZE up to MAX_TABLE_SIZE; a change is signalled with
dynamic table size updates at the start of the next block (the smallest size since the last block first, then
the final one, RFC 7541 4.2), evicting what no longer fits. It does what h2's outbound normalisation did
(lower-case names, values without surrounding whitespace).
"""

from __future__ import annotations

from collections import deque

from hpack import NeverIndexedHeaderTuple
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

STATIC_LEN = len(HeaderTable.STATIC_TABLE)
DEFAULT_TABLE_SIZE = 4096  # RFC 9113's initial SETTINGS_HEADER_TABLE_SIZE
MAX_TABLE_SIZE = 4096  # used at most, whatever a peer allows (nghttp2's deflater default, so Envoy's)
ENTRY_OVERHEAD = 32  # RFC 7541 4.1

_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FIELDS.setdefault((_name, _value), _index)
    _STATIC_NAMES.setdefault(_name, _index)

NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization", b"set-cookie"})  # and cookies under 20 bytes
# Not added to the table: values that change per message (nghttp2's list, then ids and trace context).
NOT_INDEXED = frozenset({
    b":path", b"age", b"content-length", b"etag", b"if-modified-since", b"if-none-match", b"location",
    b"x-request-id", b"traceparent", b"tracestate", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"b3",
    b"x-client-trace-id", b"grpc-timeout",
})  # fmt: skip
# Of those, the ones whose value is new on (nearly) every message: neither memoised nor Huffman-coded.
PER_REQUEST = frozenset({
    b"x-request-id", b"traceparent", b"tracestate", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"b3",
    b"x-client-trace-id",
})  # fmt: skip
KNOWN_MAX = 512  # per connection: fields whose bytes are known while the table does not change
MEMO_MAX = 4096  # field representations remembered; the memo starts afresh when full (values come from peers)
MEMO_VALUE_MAX = 256  # longer values are encoded (raw) every time, and so are never-indexed fields (credentials)

# What a field's plan says to do: send it as it is (indexed static, or a literal not indexed), or add it.
SEND, ADD = 0, 1
Plan = tuple  # (SEND, bytes) or (ADD, bytes, bytes without indexing, entry size, the value's string literal)


class NeverIndexed(NeverIndexedHeaderTuple):
    """A field a peer sent never-indexed (h2_hpack_decode makes them), to be forwarded so. It hashes unlike the
    plain tuple it equals, so that no per-connection cache of a plain twin's bytes answers for it."""

    __slots__ = ()

    def __hash__(self) -> int:
        return ~tuple.__hash__(self)


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


_INDEXED = [encode_integer(i, 7, 0x80) for i in range(STATIC_LEN + MAX_TABLE_SIZE // ENTRY_OVERHEAD + 1)]
_CODES, _LENGTHS = REQUEST_CODES[:256], REQUEST_CODES_LENGTH[:256]


def huffman(data: bytes) -> bytes:
    """RFC 7541 5.2 / Appendix B: `data` Huffman-coded, padded with the EOS code's leading 1 bits."""
    acc = bits = 0
    for byte in data:
        n = _LENGTHS[byte]
        acc = acc << n | _CODES[byte]
        bits += n
    pad = -bits % 8
    return (acc << pad | ((1 << pad) - 1)).to_bytes((bits + pad) >> 3, "big")


def encode_string(data: bytes, huffman_coded: bool = True) -> bytes:
    """A string literal: Huffman-coded when that is shorter (and asked for), else raw."""
    if huffman_coded and data:
        coded = huffman(data)
        if len(coded) < len(data):
            return encode_integer(len(coded), 7, 0x80) + coded
    return encode_integer(len(data), 7, 0) + data


def _literal(first: int, prefix_bits: int, name: bytes, value_string: bytes, huffman_coded: bool) -> bytes:
    index = _STATIC_NAMES.get(name)
    if index is not None:
        return encode_integer(index, prefix_bits, first) + value_string
    return bytes((first,)) + encode_string(name, huffman_coded) + value_string


def plan_field(name: bytes, value: bytes, never: bool = False, huffman_coded: bool = True) -> Plan:
    """How to send one field, given nothing about the dynamic table but whether it may hold it."""
    name = name.lower()
    value = value.strip(b" \t")
    index = _STATIC_FIELDS.get((name, value))
    if index is not None and not never:
        return SEND, _INDEXED[index], b"", 0
    value_string = encode_string(value, huffman_coded)
    if never or name in NEVER_INDEXED or (name == b"cookie" and len(value) < 20):
        return SEND, _literal(0x10, 4, name, value_string, huffman_coded), b"", 0  # 0001: never indexed
    plain = _literal(0x00, 4, name, value_string, huffman_coded)  # 0000: without indexing
    if name in NOT_INDEXED:
        return SEND, plain, b"", 0
    size = len(name) + len(value) + ENTRY_OVERHEAD
    return ADD, _literal(0x40, 6, name, value_string, huffman_coded), plain, size, value_string


_plans: dict[tuple[bytes, bytes], Plan] = {}


_PER_REQUEST_NAMES = {name: _literal(0x00, 4, name, b"", False) for name in PER_REQUEST}
_RAW_LENGTHS = [encode_integer(n, 7, 0) for n in range(127)]  # a raw string's length prefix, one byte


def _plan(field: tuple[bytes, bytes]) -> Plan:
    """plan_field, remembered for fields that repeat (not credentials, not ids, not long values)."""
    name, value = field[0], field[1]
    if isinstance(field, NeverIndexedHeaderTuple):
        return plan_field(name, value, never=True, huffman_coded=False)
    prefix = _PER_REQUEST_NAMES.get(name)
    if prefix is not None:  # an id: new each time, the name's bytes known
        value = value.strip(b" \t")
        return SEND, prefix + encode_integer(len(value), 7, 0) + value, b"", 0
    if len(value) > MEMO_VALUE_MAX:
        return plan_field(name, value, huffman_coded=False)
    plan = plan_field(name, value)
    if plan[0] == SEND and plan[1][0] >> 4 == 1:  # never indexed: not kept in memory
        return plan
    if len(_plans) >= MEMO_MAX:
        _plans.clear()
    _plans[field] = plan
    return plan


class Encoder:
    """Drop-in for hpack.Encoder as h2 uses it: encode(headers) and a settable header_table_size (the peer's
    SETTINGS_HEADER_TABLE_SIZE)."""

    __slots__ = ("_entries", "_inserted", "_known", "_max", "_names", "_pending_min", "_seqs", "_size", "_updated")

    def __init__(self) -> None:
        self._seqs: dict[tuple[bytes, bytes], int] = {}  # field -> its insertion number (while in the table)
        self._names: dict[bytes, int] = {}  # name -> the newest entry's insertion number, for names not static
        self._known: dict[tuple[bytes, bytes], bytes] = {}  # field -> its bytes, until the table next changes
        self._entries: deque[tuple[tuple[bytes, bytes], int]] = deque()  # (field, size), oldest first
        self._inserted = 0  # insertions so far: the newest entry's number + 1
        self._size = 0
        self._max = DEFAULT_TABLE_SIZE  # the table's size as the peer's decoder knows it (after pending updates)
        self._pending_min: int | None = None  # the smallest size since the last block, when it changed
        self._updated = False  # a size update is due at the start of the next block

    @property
    def header_table_size(self) -> int:
        return self._max

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        size = min(value, MAX_TABLE_SIZE)
        if size == self._max:
            return
        self._max = size
        self._updated = True
        if self._pending_min is None or size < self._pending_min:
            self._pending_min = size
        self._evict(size)
        self._known.clear()

    def table(self) -> list[tuple[bytes, bytes]]:
        """The dynamic table's fields as the peer's decoder holds them, newest first (for tests)."""
        return [(f[0].lower(), f[1].strip(b" \t")) for f, _ in reversed(self._entries)]

    def encode(self, headers, huffman: bool = True) -> bytes:  # huffman: decided per string (shorter or not)
        """One header block. Fields whose bytes the connection knows (a response like the last ones, no entry
        added since) are a dict lookup each, in C; the others are worked out in order, and once one adds to the
        table (which moves every entry's index) the rest are worked out too."""
        if type(headers) is not list:
            headers = list(headers)
        parts = []
        if self._updated:
            if self._pending_min is not None and self._pending_min < self._max:
                parts.append(encode_integer(self._pending_min, 5, 0x20))
            parts.append(encode_integer(self._max, 5, 0x20))
            self._updated = False
            self._pending_min = None
            return b"".join(parts) + self._encode(headers)
        try:
            parts = list(map(self._known.get, headers))
        except TypeError:  # fields given as lists
            return self._encode(headers)
        if None in parts:
            if len(self._known) > KNOWN_MAX:
                self._known.clear()
            for i in [i for i, part in enumerate(parts) if part is None]:
                field = headers[i]
                prefix = _PER_REQUEST_NAMES.get(field[0])
                if prefix is not None and type(field) is tuple:  # an id (new each time): its bytes at once
                    value = field[1].strip(b" \t")
                    n = len(value)
                    parts[i] = prefix + (_RAW_LENGTHS[n] if n < 127 else encode_integer(n, 7, 0)) + value
                    continue
                inserted = self._inserted
                parts[i] = self._field(field)
                if self._inserted != inserted:
                    return b"".join(parts[: i + 1]) + self._encode(headers[i + 1 :])
        return b"".join(parts)

    def _encode(self, headers: list) -> bytes:
        field_bytes = self._field
        return b"".join([field_bytes(field) for field in headers])

    def _field(self, field) -> bytes:
        """One field's bytes (the table and the known fields updated)."""
        try:
            seq = self._seqs.get(field)
        except TypeError:  # fields may come as lists
            field = (field[0], field[1])
            seq = self._seqs.get(field)
        never = isinstance(field, NeverIndexedHeaderTuple)
        if seq is not None and not never:
            self._known[field] = encoded = _INDEXED[STATIC_LEN + self._inserted - seq]
            return encoded
        plan = None if never else _plans.get(field)
        if plan is None:
            plan = _plan(field)
            keep = _plans.get(field) is plan  # remembered: not a credential, an id or a long value
        else:
            keep = True
        if plan[0] == SEND:
            if keep:
                self._known[field] = plan[1]
            return plan[1]
        seq = self._names.get(field[0])  # the name of an entry of ours (never a static name: not mapped)
        if plan[3] <= self._max * 3 >> 2:
            # the entry's index as the name, resolved before this insertion (RFC 7541 4.4)
            encoded = plan[1] if seq is None else encode_integer(STATIC_LEN + self._inserted - seq, 6, 0x40) + plan[4]
            self._add(field, plan[3])  # the indices of the fields known so far change
            return encoded
        if seq is None:
            return plan[2]  # too large for this table: sent without indexing
        return encode_integer(STATIC_LEN + self._inserted - seq, 4, 0x00) + plan[4]

    def _add(self, field: tuple[bytes, bytes], size: int) -> None:
        self._known.clear()
        self._evict(self._max - size)
        seq = self._seqs[field] = self._inserted
        name = field[0]
        if name not in _STATIC_NAMES and name == name.lower():  # as the peer's table holds it
            self._names[name] = seq
        self._inserted += 1
        self._entries.append((field, size))
        self._size += size

    def _evict(self, room: int) -> None:
        """Evict the oldest entries until the table holds at most `room` bytes (RFC 7541 4.3, 4.4)."""
        entries = self._entries
        names = self._names
        while self._size > room and entries:
            field, size = entries.popleft()
            seq = self._seqs.pop(field)
            if names.get(field[0]) == seq:  # the newest of its name: no entry of that name is left
                del names[field[0]]
            self._size -= size
