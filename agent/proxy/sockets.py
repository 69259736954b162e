"""Upstream sockets, made one way for every upstream the proxy opens (HTTP pool, h2, passthrough, mirrors):
the own-traffic SO_MARK so the data path never re-intercepts them, and the destination plane's source address."""

from __future__ import annotations

import asyncio
import socket

SO_MARK = getattr(socket, "SO_MARK", 36)


async def open_upstream(host: str, port: int, *, mark: int, source: str | None, timeout: float) -> socket.socket:
    """A connected, non-blocking TCP socket to (host, port), marked and bound as above."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if source:
            sock.bind((source, 0))
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock
