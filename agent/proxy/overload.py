"""A worker's overload manager (Envoy's idea, its fixed_heap monitor and actions): sans-IO.

The proxy samples its memory every SAMPLE_INTERVAL_S (`update(rss, connections)`) and asks the manager:

- level NORMAL: nothing to do.
- level SOFT (RSS above SOFT_FRACTION of the plane's `memory_max_mb`): no keep-alive (responses say
  `connection: close`), new connections and requests are shed with 503 + `connection: close` +
  `x-planemesh-overloaded: memory`, idle connections get the short idle timeout. Keep-alive alone also stops
  while the worker holds more than KEEPALIVE_CONNECTION_FRACTION of the plane's max_connections.
- level HARD (above HARD_FRACTION): as SOFT, and `victims(connections)` names the connections to reset,
  those buffering the most first, until their buffers cover the excess over the soft threshold.

Node-wide overload (agent/node_pressure.py): the agent tells the worker a shed fraction for its plane
(`set_node_shed`, 0..1) when the node runs short of CPU or memory and the plane is not of the highest
priority. While it is above 0 keep-alive stops and `refuse()` answers that share of requests (spread evenly by an
error-diffusion counter, not at random) with the reason REFUSED_NODE: a 503 with `x-planemesh-overloaded: node`.

Connections take part through the BufferHolder protocol: `buffered_bytes()` (what the connection holds in
user space and in its transports' write buffers) and `abort()` (reset it now, freeing all of that). The HTTP/1.1
connection (downstream.Downstream) implements it; an HTTP/2 connection can implement the same two methods and
be passed in the same iterable.

Memory is read from /proc/self/statm (resident pages), the cheapest honest measure of what the kernel charges
the process: Python's own allocator statistics miss the transports' buffers and fragmentation. What is compared
with the cap is the growth over the RSS when the proxy was made (RssGrowth): the interpreter and its modules
(about 30 MB in a worker) are not the clients' doing, and a proxy embedded in a bigger process (tests, host-mode
experiments: bcc/LLVM alone is ~200 MB) is judged on what it holds itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Protocol

SAMPLE_INTERVAL_S = 0.25  # Envoy samples its resource monitors every 1 s by default; floods grow faster here
SOFT_FRACTION = 0.80  # shed and stop keep-alive (Envoy examples: stop_accepting_requests at 0.95)
HARD_FRACTION = 0.95  # reset the biggest buffers (Envoy examples: reset_high_memory_stream at 0.95..0.99)
KEEPALIVE_CONNECTION_FRACTION = 0.9  # of max_connections: close after each response to free the budget
MIB = 1 << 20
SHED_MEMORY, SHED_NODE = "memory", "node"  # why refuse() sheds: the x-planemesh-overloaded value
SHED_HEADERS = {why: ((b"x-planemesh-overloaded", why.encode()),) for why in (SHED_MEMORY, SHED_NODE)}
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Level(IntEnum):
    NORMAL = 0
    SOFT = 1
    HARD = 2


class BufferHolder(Protocol):
    def buffered_bytes(self) -> int: ...

    def abort(self) -> None: ...


def read_rss(path: str = "/proc/self/statm") -> int:
    """Resident set size of this process in bytes (0 if it cannot be read: then nothing is shed)."""
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


class RssGrowth:
    """Bytes of RSS above what the process held when this object was made (never negative)."""

    __slots__ = ("_read", "baseline")

    def __init__(self, read: Callable[[], int] = read_rss) -> None:
        self._read = read
        self.baseline = read()

    def __call__(self) -> int:
        return max(0, self._read() - self.baseline)


class OverloadManager:
    __slots__ = (
        "_node_debt",
        "connections",
        "hard_bytes",
        "keep_alive",
        "keepalive_connections",
        "level",
        "node_refused",
        "node_shed",
        "rss",
        "shedding",
        "soft_bytes",
    )

    def __init__(self, memory_max_mb: int, max_connections: int) -> None:
        self.level = Level.NORMAL
        self.shedding = False  # new connections and requests are refused (503)
        self.keep_alive = True  # responses may keep their connection open (read per request: an attribute)
        self.rss = 0
        self.connections = 0
        self.node_shed = 0.0  # share of requests to refuse for the node's sake (set by the agent)
        self._node_debt = 0.0
        self.node_refused = 0  # requests refuse() shed for the node's sake (metric planemesh_node_shed_requests)
        self.configure(memory_max_mb, max_connections)

    def configure(self, memory_max_mb: int, max_connections: int) -> None:
        cap = max(1, memory_max_mb) * MIB
        self.soft_bytes = int(cap * SOFT_FRACTION)
        self.hard_bytes = int(cap * HARD_FRACTION)
        self.keepalive_connections = int(max_connections * KEEPALIVE_CONNECTION_FRACTION)
        self._reassess()

    def update(self, rss: int, connections: int) -> Level:
        self.rss = rss
        self.connections = connections
        return self._reassess()

    def set_node_shed(self, fraction: float) -> None:
        self.node_shed = min(1.0, max(0.0, float(fraction)))
        if self.node_shed == 0.0:
            self._node_debt = 0.0
        self._reassess()

    def refuse(self) -> str | None:
        """For a request while keep_alive is off: why to shed it (SHED_MEMORY, SHED_NODE), or None to serve it.
        Node shedding refuses `node_shed` of the requests asked about, evenly spaced."""
        if self.shedding:
            return SHED_MEMORY
        if self.node_shed <= 0.0:
            return None
        self._node_debt += self.node_shed
        if self._node_debt >= 1.0 - 1e-9:
            self._node_debt -= 1.0
            self.node_refused += 1
            return SHED_NODE
        return None

    def _reassess(self) -> Level:
        if self.rss > self.hard_bytes:
            self.level = Level.HARD
        elif self.rss > self.soft_bytes:
            self.level = Level.SOFT
        else:
            self.level = Level.NORMAL
        self.shedding = self.level >= Level.SOFT
        self.keep_alive = (
            self.level == Level.NORMAL and self.node_shed == 0.0 and self.connections <= self.keepalive_connections
        )
        return self.level

    def victims(self, holders: Iterable[BufferHolder]) -> list[BufferHolder]:
        """At HARD: the connections to reset, biggest buffers first, until they hold the excess over the soft
        threshold (at least one, if any buffers at all). Otherwise none."""
        if self.level < Level.HARD:
            return []
        excess = self.rss - self.soft_bytes
        sized = sorted(((h.buffered_bytes(), i, h) for i, h in enumerate(holders)), key=lambda t: (-t[0], t[1]))
        chosen: list[BufferHolder] = []
        freed = 0
        for size, _, holder in sized:
            if size <= 0 or freed >= excess:
                break
            chosen.append(holder)
            freed += size
        return chosen
