"""The control channel between the agent and a plane's worker process: length-prefixed pickles.

Messages are small dicts: {"op": "snapshot", "snapshot": Snapshot}, {"op": "drain", "timeout": s},
{"op": "stats"} (request) / {"op": "stats", "stats": {...}} (reply), {"op": "ready"}.
Every request after the first snapshot carries an "id"; the worker echoes it in the reply, so a reply that
arrives after its requester gave up (a slow or stopped worker) is recognised and dropped, never taken for the
answer to a later request. RequestTable is the sans-IO bookkeeping of that; the agent's I/O is in workers.py.
Both ends are trusted processes of the same agent (a socketpair), so pickle is acceptable here.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

_HEADER = struct.Struct("!I")
MAX_MESSAGE = 256 << 20


def encode(message: dict[str, Any]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at EOF."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ValueError(f"control message of {size} bytes exceeds {MAX_MESSAGE}")
    return pickle.loads(await reader.readexactly(size))


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
