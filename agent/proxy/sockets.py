"""The proxy's sockets, each kind made in one place: listening sockets (transparent, dual-stack; also the labs'
and tests' plain listeners), and upstream sockets for every upstream the proxy opens (HTTP pool, h2,
passthrough, mirrors): the own-traffic SO_MARK so the data path never re-intercepts them, and the destination
plane's source address."""

from __future__ import annotations

import asyncio
import socket

SO_MARK = getattr(socket, "SO_MARK", 36)
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"


def listen_backlog() -> int:
    """The accept-queue length the kernel allows in the caller's network namespace (net.core.somaxconn, read
    per call: it is per netns). A larger backlog is cut to it; asyncio's default (100) wastes it."""
    try:
        with open(SOMAXCONN_PATH) as f:
            return max(1, int(f.read()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


def make_listener_socket(
    port: int, *, transparent: bool = True, host: str = "::", backlog: int | None = None
) -> socket.socket:
    """A listening socket for a plane's proxy port. Transparent sockets (root) accept connections the
    kernel assigned to them whatever their destination, so getsockname() is the original destination.
    The backlog is the kernel's somaxconn unless given."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual-stack: v4 as ::ffff:a.b.c.d
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        sock.bind((host, port))
        sock.listen(listen_backlog() if backlog is None else backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


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
