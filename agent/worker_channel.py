"""The control channel between the agent and a plane's worker process: length-prefixed pickles.

Messages are small dicts: {"op": "snapshot", "snapshot": Snapshot}, {"op": "drain", "timeout": s},
{"op": "stats"} (request) / {"op": "stats", "stats": {...}} (reply), {"op": "ready"}.
Every request after the first snapshot carries an "id"; the worker echoes it in the reply, so a reply that
arrives after its requester gave up (a slow or stopped worker) is recognised and dropped, never taken for the
answer to a later request. RequestTable is the sans-IO bookkeeping of that; the agent's I/O is in workers.py.
Both ends are trusted processes of the same agent (a socketpair), so pickle is acceptable here.

Snapshot messages are sent as changes: SnapshotEncoder (agent) and SnapshotDecoder (worker) keep, in step, a
table of the route configs, virtual hosts, routes and clusters of the last snapshot; an object already in it
is sent as its number, so a one-route change in 10,000 routes pickles one virtual host instead of the table,
and the worker gets the very objects it had (agent/proxy/routing.py then reuses their compiled matchers).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from planemesh import cpickle as pickle
from planemesh.model.config import Cluster, Route, RouteConfig, VirtualHost

_HEADER = struct.Struct("!I")
MAX_MESSAGE = 256 << 20


def encode(message: dict[str, Any]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def read_message(
    reader: asyncio.StreamReader, decoder: SnapshotDecoder | None = None
) -> dict[str, Any] | None:
    """The next message, or None at EOF; `decoder`: the worker's table of shared objects (snapshots)."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ValueError(f"control message of {size} bytes exceeds {MAX_MESSAGE}")
    body = await reader.readexactly(size)
    return decoder.decode(body) if decoder is not None else pickle.loads(body)


_SHARED = (RouteConfig, VirtualHost, Route, Cluster)


def _children(obj: object) -> Iterator[object]:
    """The shared objects `obj` holds: they stay in the table while it does."""
    if isinstance(obj, RouteConfig):
        yield from obj.virtual_hosts
    elif isinstance(obj, VirtualHost):
        yield from obj.routes


class _Table:
    """Objects of the last snapshot by number, with the same numbers on both ends of the channel. Each
    snapshot builds a new table (as it is encoded or decoded) from the objects it holds."""

    def __init__(self) -> None:
        self.by_n: dict[int, object] = {}
        self.n_of: dict[int, int] = {}  # id(obj) -> n; the object is held by by_n, so its id stays its own
        self.next = 1

    def add(self, n: int, obj: object) -> None:
        self.by_n[n] = obj
        self.n_of[id(obj)] = n

    def keep(self, old: _Table, n: int, obj: object) -> None:
        """`obj` of the `old` table is in this snapshot, and so is everything it holds."""
        stack = [(n, obj)]
        while stack:
            n, obj = stack.pop()
            if n in self.by_n:
                continue
            self.add(n, obj)
            for child in _children(obj):
                cn = old.n_of.get(id(child))
                if cn is not None and old.by_n.get(cn) is child:
                    stack.append((cn, child))


class _SharingPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, table: _Table) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.table = table
        self.used = _Table()  # the table after this snapshot
        self.used.next = table.next
        self.payload: set[int] = set()  # ids of the new objects written out in full in this message
        self.refs = self.new = 0

    def persistent_id(self, obj: object) -> Any:
        if type(obj) not in _SHARED or id(obj) in self.payload:
            return None  # the payload of a new entry, or a repeat of it (pickle's memo refers to it)
        n = self.table.n_of.get(id(obj))
        if n is not None and self.table.by_n.get(n) is obj:
            self.refs += 1
            self.used.keep(self.table, n, obj)
            return n
        n = self.used.next
        self.used.next += 1
        self.payload.add(id(obj))
        self.used.add(n, obj)
        self.new += 1
        return (n, obj)


class SnapshotEncoder:
    """The agent's end for one worker: encode() as the module's, with snapshots sent as changes.

    A snapshot message goes as two pickles in one frame: the message without its snapshot, then the snapshot
    against the table. Workers that were sent the same snapshots have equal tables, so the snapshot part is
    encoded once for all of them (_ENCODED; every plane's worker gets every snapshot: 10,000 routes cost
    ~0.25 s to pickle)."""

    def __init__(self) -> None:
        self._table = _Table()
        self._lineage = 0  # which sequence of snapshots this table has seen (0: none)
        self.refs = 0  # shared objects sent as a number, over the channel's life
        self.new = 0  # shared objects sent in full

    def encode(self, message: dict[str, Any]) -> bytes:
        if message.get("op") != "snapshot":
            return encode(message)
        snapshot = message["snapshot"]
        head = pickle.dumps({k: v for k, v in message.items() if k != "snapshot"}, protocol=pickle.HIGHEST_PROTOCOL)
        key = (self._lineage, id(snapshot))
        done = _ENCODED.get(key)
        if done is None or done.snapshot is not snapshot:
            buf = io.BytesIO()
            pickler = _SharingPickler(buf, self._table)
            pickler.dump(snapshot)
            done = _Encoded(snapshot, buf.getvalue(), pickler.used, next(_LINEAGES), pickler.refs, pickler.new)
            if any(e.snapshot is not snapshot for e in _ENCODED.values()):
                _ENCODED.clear()  # workers are only ever sent the newest snapshot: older encodings are done with
            _ENCODED[key] = done
        self._table = done.table  # only once the whole snapshot is encoded (read-only: shared by encoders)
        self._lineage = done.lineage
        self.refs += done.refs
        self.new += done.new
        body = head + done.body
        return _HEADER.pack(len(body)) + body


@dataclass
class _Encoded:
    snapshot: object  # held: the key's id stays this snapshot's
    body: bytes
    table: _Table
    lineage: int
    refs: int
    new: int


_ENCODED: dict[tuple[int, int], _Encoded] = {}  # (lineage, id(snapshot)) -> its encoding, newest snapshot only
_LINEAGES = itertools.count(1)


class _SharingUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, table: _Table) -> None:
        super().__init__(file)
        self.table = table
        self.used = _Table()

    def persistent_load(self, pid: Any) -> object:
        if isinstance(pid, int):
            obj = self.table.by_n.get(pid)
            if obj is None:
                raise pickle.UnpicklingError(f"shared object {pid} is not in the table")
            self.used.keep(self.table, pid, obj)
            return obj
        n, obj = pid
        self.used.add(n, obj)
        return obj


class SnapshotDecoder:
    """The worker's end: the objects of the last snapshot, in step with the agent's SnapshotEncoder."""

    def __init__(self) -> None:
        self._table = _Table()

    def decode(self, body: bytes) -> dict[str, Any]:
        stream = io.BytesIO(body)
        message = pickle.load(stream)
        if isinstance(message, dict) and message.get("op") == "snapshot" and "snapshot" not in message:
            unpickler = _SharingUnpickler(stream, self._table)  # SnapshotEncoder's second part
            message["snapshot"] = unpickler.load()
            self._table = unpickler.used
        return message


class ChannelError(RuntimeError):
    """The worker broke the protocol (a reply to an unknown id or of the wrong kind): restart it."""


@dataclass
class _Request:
    expect: str
    sent_at: float
    abandoned: bool = False  # the requester gave up; the late reply is dropped when it comes


class RequestTable:
    """Requests sent to one worker and not answered yet, by id (sans-IO; `now` is a monotonic clock).

    The worker answers in order, so a reply with id N also settles every older request still listed: their
    replies can no longer come. `stalled_for` (how long the oldest unanswered request has waited, counting
    abandoned ones) is what the supervisor reads to decide that a worker is stuck.
    """

    def __init__(self) -> None:
        self._next = 1
        self._open: dict[int, _Request] = {}
        self.dropped = 0  # late replies discarded

    def new(self, expect: str, now: float) -> int:
        rid = self._next
        self._next += 1
        self._open[rid] = _Request(expect, now)
        return rid

    def abandon(self, rid: int) -> None:
        if rid in self._open:
            self._open[rid].abandoned = True

    def reply(self, message: dict[str, Any]) -> int | None:
        """The id of the live request `message` answers; None when it answers an abandoned one (dropped).
        ChannelError when it answers nothing that was asked, or is the wrong kind of reply."""
        rid = message.get("id")
        req = self._open.get(rid) if isinstance(rid, int) else None
        if req is None:
            raise ChannelError(f"reply {message.get('op')!r} with id {rid!r} answers no open request")
        if message.get("op") != req.expect:
            raise ChannelError(f"request {rid} expected {req.expect!r}, got {message.get('op')!r}")
        for older in [k for k in self._open if k <= rid]:
            del self._open[older]
        if req.abandoned:
            self.dropped += 1
            return None
        return rid

    def stalled_for(self, now: float) -> float:
        return max((now - r.sent_at for r in self._open.values()), default=0.0)

    def waiting(self, expect: str) -> bool:
        """A request of this kind is still unanswered (abandoned or not)."""
        return any(r.expect == expect for r in self._open.values())

    def close(self) -> list[int]:
        """The channel is gone: the ids of the live requests to fail."""
        live = [k for k, r in self._open.items() if not r.abandoned]
        self._open.clear()
        return live
