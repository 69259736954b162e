"""HPACK decoding for the proxy's h2 connections, without I/O (RFC 7541): a decoder that remembers.

hpack's Decoder Huffman-decodes every literal in pure Python; servers (nginx) send each response's fields
Huffman-coded and indexed, so a response head that differs only in its `date` was most of an upstream h2 stream's
cost. This one keeps the decoded form of each Huffman string it has seen (values repeat: content types, server
names, status texts), and remembers whole header blocks: one that refers to no dynamic-table entry means the same
fields whatever the table holds, and is remembered with the entries it adds (replayed on the next sight: nginx
sends the same block, indexing its fields again, for each response); one that refers to the table is remembered
while the table stays as it was (a client's repeated requests are the same few bytes of indexed fields).

Errors are hpack's exceptions (HPACKDecodingError, InvalidTableIndex, OversizedHeaderListError): the codec turns
them into COMPRESSION_ERROR (or ENHANCE_YOUR_CALM for an oversized list).
"""

from __future__ import annotations

from collections import deque

from hpack import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from planemesh.agent.proxy.h2_hpack import NeverIndexed

STATIC = HeaderTable.STATIC_TABLE
STATIC_LEN = len(STATIC)
DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE: the proxy never advertises another
ENTRY_OVERHEAD = 32  # RFC 7541 4.1
MEMO_MAX = 4096  # blocks (and Huffman strings) remembered; the memo starts afresh when full (input from peers)
MEMO_VALUE_MAX = 256  # longer blocks and strings are decoded every time
MAX_INTEGER_BYTES = 5  # continuation bytes of one integer: past 2^28 or so nothing in a header block is valid


class Table:
    """The dynamic table: newest first (index STATIC_LEN + 1)."""

    __slots__ = ("dynamic_entries", "maxsize", "size")

    def __init__(self, maxsize: int) -> None:
        self.dynamic_entries: deque[tuple[bytes, bytes]] = deque()
        self.maxsize = maxsize
        self.size = 0

    def get(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= STATIC_LEN:
            return STATIC[index - 1]
        index -= STATIC_LEN + 1
        if 0 <= index < len(self.dynamic_entries):
            return self.dynamic_entries[index]
        raise InvalidTableIndex(f"invalid table index {index + STATIC_LEN + 1}")

    def add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + ENTRY_OVERHEAD
        if size > self.maxsize:  # RFC 7541 4.4: the table is emptied, the entry not added
            self.dynamic_entries.clear()
            self.size = 0
            return
        self.dynamic_entries.appendleft((name, value))
        self.size += size
        if self.size > self.maxsize:
            self._shrink()

    def add_all(self, fields: list[tuple[bytes, bytes]]) -> None:
        """add() of each field in order (a remembered block's entries: nginx indexes each response's again)."""
        entries = self.dynamic_entries
        maxsize = self.maxsize
        for field in fields:
            size = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
            if size > maxsize:
                entries.clear()
                self.size = 0
                continue
            entries.appendleft(field)
            self.size += size
            if self.size > maxsize:
                self._shrink()

    def resize(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._shrink()

    def _shrink(self) -> None:
        entries = self.dynamic_entries
        while self.size > self.maxsize:
            name, value = entries.pop()
            self.size -= len(name) + len(value) + ENTRY_OVERHEAD


class MemoDecoder:
    """decode(block) -> [(name, value), ...], the dynamic table kept across blocks (one per connection)."""

    __slots__ = ("_huffman", "_memo", "_stable", "header_table", "max_allowed_table_size", "max_header_list_size")

    def __init__(self, max_header_list_size: int) -> None:
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE
        self.header_table = Table(DEFAULT_TABLE_SIZE)
        self._memo: dict[bytes, list[tuple[bytes, bytes]]] = {}  # blocks that refer to the table as it is
        self._stable: dict[bytes, tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]] = {}  # (fields, adds)
        self._huffman: dict[bytes, bytes] = {}

    def decode(self, data: bytes, raw: bool = True) -> list[tuple[bytes, bytes]]:
        stable = self._stable.get(data)
        if stable is not None:
            headers, adds = stable
            if adds:
                self.header_table.add_all(adds)
                self._memo.clear()
            return list(headers)  # the caller may change its list: never the memo's own
        memo = self._memo
        found = memo.get(data)
        if found is not None:
            return list(found)
        headers, adds, refers = self._decode(data)
        if adds or refers is None:
            memo.clear()  # the table changed: the same bytes may mean something else now
        if len(data) > MEMO_VALUE_MAX:
            return headers
        if refers is False:
            if len(self._stable) >= MEMO_MAX:
                self._stable.clear()
            self._stable[data] = (headers, adds)
        elif refers and not adds:
            if len(memo) >= MEMO_MAX:
                memo.clear()
            memo[data] = headers
        else:
            return headers
        return list(headers)

    def _decode(self, data: bytes) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], bool | None]:
        """(the fields, the entries added to the table, whether an entry of the table was referred to; None: the
        table was resized)."""
        table = self.header_table
        headers: list[tuple[bytes, bytes]] = []
        adds: list[tuple[bytes, bytes]] = []
        refers: bool | None = False
        total = 0
        limit = self.max_header_list_size
        pos, end = 0, len(data)
        while pos < end:
            first = data[pos]
            if first & 0x80:  # indexed field
                index, pos = _integer(data, pos, 7)
                if not index:
                    raise HPACKDecodingError("indexed field 0")
                if index > STATIC_LEN and refers is not None:
                    refers = True
                field = table.get(index)
            elif first & 0x40:  # literal with incremental indexing
                field, pos, dynamic = self._literal(data, pos, 6)
                if dynamic and refers is not None:
                    refers = True
                table.add(*field)
                adds.append(field)
            elif first & 0x20:  # dynamic table size update: only before the first field (RFC 7541 4.2)
                if headers:
                    raise HPACKDecodingError("table size update after a field")
                size, pos = _integer(data, pos, 5)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError(f"table size {size} past the {self.max_allowed_table_size} allowed")
                table.resize(size)
                refers = None
                continue
            else:  # literal without indexing (0000) or never indexed (0001)
                field, pos, dynamic = self._literal(data, pos, 4)
                if dynamic and refers is not None:
                    refers = True
                if first & 0x10:  # never indexed: forwarded as such (RFC 7541 7.1.3), our encoder sees the type
                    field = NeverIndexed(*field)
            total += len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
            if total > limit:
                raise OversizedHeaderListError(f"header list past {limit} bytes")
            headers.append(field)
        return headers, adds, refers

    def _literal(self, data: bytes, pos: int, prefix: int) -> tuple[tuple[bytes, bytes], int, bool]:
        """(name, value), the position after it, whether its name came from the dynamic table."""
        index, pos = _integer(data, pos, prefix)
        if index:
            name = self.header_table.get(index)[0]
        else:
            name, pos = self._string(data, pos)
        value, pos = self._string(data, pos)
        return (name, value), pos, index > STATIC_LEN

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        if pos >= len(data):
            raise HPACKDecodingError("a string past the end of the block")
        huffman = data[pos] & 0x80
        length, pos = _integer(data, pos, 7)
        end = pos + length
        if end > len(data):
            raise HPACKDecodingError("a string past the end of the block")
        raw = data[pos:end]
        if not huffman:
            return raw, end
        cache = self._huffman
        found = cache.get(raw)
        if found is None:
            found = decode_huffman(raw)
            if length <= MEMO_VALUE_MAX:
                if len(cache) >= MEMO_MAX:
                    cache.clear()
                cache[raw] = found
        return found, end


def _integer(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """RFC 7541 5.1: the integer whose N-bit prefix is in data[pos], and the position after it."""
    mask = (1 << prefix) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    for _ in range(MAX_INTEGER_BYTES):
        if pos >= len(data):
            raise HPACKDecodingError("an integer past the end of the block")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise HPACKDecodingError("an integer too long")
