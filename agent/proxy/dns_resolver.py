"""The I/O half of DNS clusters: ask the system resolver (getaddrinfo: /etc/hosts, then the node's DNS
configuration) for the hosts agent/proxy/dns.py says are due, and feed the answers back.

One task per worker; it sleeps until the next cluster is due or `kick()` (a new snapshot) wakes it. A lookup
that hangs is bounded by `timeout_s` and counts as failed (the host keeps its addresses).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable

from planemesh.agent.proxy.dns import DnsRefresh

LOOKUP_TIMEOUT_S = 5.0  # Envoy's c-ares default query timeout is 5 s
Resolve = Callable[[str], Awaitable[list[str]]]


async def system_resolve(host: str) -> list[str]:
    """Every address the system resolver gives for `host` (TCP), in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class DnsResolver:
    def __init__(
        self,
        refresh: DnsRefresh,
        resolve: Resolve = system_resolve,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = LOOKUP_TIMEOUT_S,
    ) -> None:
        self.refresh = refresh
        self._resolve = resolve
        self._clock = clock
        self._timeout_s = timeout_s
        self._wake = asyncio.Event()
        self._lookups: set[asyncio.Task] = set()
        self.lookups = 0  # host lookups made (stats, tests)

    def kick(self) -> None:
        """Something changed (a new snapshot was synced): look at the schedule again."""
        self._wake.set()

    async def _one(self, host: str) -> list[str] | None:
        self.lookups += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._resolve(host)
        except (OSError, TimeoutError, UnicodeError, ValueError):
            return None  # socket.gaierror is an OSError

    async def _cluster(self, name: str, hosts: tuple[str, ...]) -> None:
        answers = await asyncio.gather(*(self._one(h) for h in hosts))
        self.refresh.resolved(name, dict(zip(hosts, answers, strict=True)))
        self._wake.set()  # its next time is now known

    async def run(self) -> None:
        try:
            while True:
                self._wake.clear()
                for name, hosts in self.refresh.due():
                    task = asyncio.get_running_loop().create_task(self._cluster(name, hosts), name=f"dns-{name}")
                    self._lookups.add(task)
                    task.add_done_callback(self._lookups.discard)
                nxt = self.refresh.next_due()
                wait = None if nxt is None else max(0.0, nxt - self._clock())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
        finally:
            for task in list(self._lookups):
                task.cancel()
