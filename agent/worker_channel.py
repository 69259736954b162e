"""The control channel between the agent and a plane's worker process: length-prefixed pickles.

Messages are small dicts: {"op": "snapshot", "snapshot": Snapshot}, {"op": "drain", "timeout": s},
{"op": "stats"} (request) / {"op": "stats", "stats": {...}} (reply), {"op": "ready"}.
Both ends are trusted processes of the same agent (a socketpair), so pickle is acceptable here.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
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
