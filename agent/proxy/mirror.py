"""Request mirroring: a copy of the request goes to a shadow cluster; its answer is read and dropped.

Shadow requests never touch the primary exchange: they run as tracked tasks with their own timeout, at
most `max_inflight` at once (beyond that a shadow copy is skipped and counted), and every failure is
counted, never raised. Like Envoy, the shadow's Host gets a `-shadow` suffix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from planemesh.agent.proxy.http1 import TRAILER_DROP
from planemesh.agent.proxy.sockets import open_upstream


def mirror_targets(mirrors, clusters, balancer, roll: Callable[[], float]) -> list[tuple[str, int]]:
    """Where shadow copies of one request go: an endpoint of each mirror cluster whose fraction `roll()` hits
    (pipeline step of both codecs; a missing cluster or one with no endpoint is skipped)."""
    out = []
    for mirror in mirrors:
        if mirror.fraction < 1.0 and roll() >= mirror.fraction:
            continue
        cluster = clusters.get(mirror.cluster)
        if cluster is None:
            continue
        ep = balancer.pick_endpoint(cluster)
        if ep is not None:
            out.append((ep.address, ep.port))
    return out


def shadow_request(method: bytes, path: bytes, authority: bytes, fields, body: bytes) -> bytes:
    """An HTTP/1.1 shadow request from a neutral request head (an h2 stream's): Host `<authority>-shadow`,
    the body with its length, `connection: close`."""
    parts = [method, b" ", path, b" HTTP/1.1\r\nhost: ", authority, b"-shadow\r\n"]
    for n, v in fields:
        if n not in TRAILER_DROP and n[:1] != b":":
            parts += (n, b": ", v, b"\r\n")
    if body or method not in (b"GET", b"HEAD"):
        parts.append(b"content-length: %d\r\n" % len(body))
    parts += (b"connection: close\r\n\r\n", body)
    return b"".join(parts)


def shadow_head(head: bytes) -> bytes:
    """The request head with `Host: x` -> `Host: x-shadow` and `connection: close` (one-shot connection)."""
    lines = head.split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        if not line:
            continue
        name = line.split(b":", 1)[0].strip().lower()
        if name == b"host":
            line = line.rstrip() + b"-shadow"
        elif name == b"connection":
            continue
        out.append(line)
    out += [b"connection: close", b"", b""]
    return b"\r\n".join(out)


class MirrorSender:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        binding: Callable[[str], tuple[str | None, int]] = lambda _host: (None, 0),
        *,
        timeout_s: float = 5.0,
        max_inflight: int = 64,
    ) -> None:
        self.loop = loop
        self.binding = binding  # host -> (source address, SO_MARK): PlaneProxy.upstream_binding
        self.timeout_s = timeout_s
        self.max_inflight = max_inflight
        self.tasks: set[asyncio.Task] = set()
        self.sent = 0
        self.failed = 0
        self.skipped = 0

    def send(self, addr: tuple[str, int], request: bytes) -> None:
        if len(self.tasks) >= self.max_inflight:
            self.skipped += 1
            return
        task = self.loop.create_task(self._send(addr, request))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if task.cancelled() or task.exception() is not None:
            self.failed += 1
        else:
            self.sent += 1

    async def _send(self, addr: tuple[str, int], request: bytes) -> None:
        # Like every proxy upstream socket: from the shadow's plane, marked so the data path never re-intercepts it.
        source, mark = self.binding(addr[0])
        sock = await open_upstream(addr[0], addr[1], mark=mark, source=source, timeout=self.timeout_s)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.loop.sock_sendall(sock, request)
                while await self.loop.sock_recv(sock, 65536):  # drain until the server closes
                    pass
        finally:
            sock.close()

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()

