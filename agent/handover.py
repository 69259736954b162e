"""Hot upgrade: a new agent takes the listening sockets from the running one, which then drains.

The running agent serves a unix socket (<runtime>/handover.sock). A new agent connects and sends
TAKEOVER; the old one answers with a manifest (port per listening socket) and the sockets themselves
(SCM_RIGHTS). The kernel keeps one listening socket per port throughout, so the data path always finds a
listener. When the new agent is ready it sends DONE: the old one stops accepting, finishes in-flight
requests and exits *without* detaching programs or routes (they belong to the new agent now).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("planemesh.handover")
MAX_FDS = 256


def _send_fds(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    socket.send_fds(sock, [payload], fds)


class HandoverServer:
    """In the running agent: hands its listening sockets to a successor on request."""

    def __init__(self, path: Path, listeners: Callable[[], dict[int, socket.socket]], on_done: Callable[[], None]):
        self.path = path
        self._listeners = listeners
        self._on_done = on_done
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # only reached when no agent answered on it (see take_over)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if (await asyncio.wait_for(reader.readline(), 10)).strip() != b"TAKEOVER":
                return
            listeners = self._listeners()
            manifest = json.dumps({"ports": list(listeners)}).encode() + b"\n"
            raw = writer.get_extra_info("socket")
            with contextlib.suppress(Exception):
                await writer.drain()
            # send_fds on the underlying socket: asyncio streams cannot carry ancillary data.
            dup = socket.socket(fileno=os.dup(raw.fileno()))
            try:
                dup.setblocking(True)
                _send_fds(dup, manifest, [s.fileno() for s in listeners.values()])
            finally:
                dup.close()
            log.info("handover: sent %d listening sockets to a new agent", len(listeners))
            line = await reader.readline()  # the successor says DONE when it serves; EOF means it gave up
            if line.strip() == b"DONE":
                log.info("handover: the new agent is serving; draining and leaving the data path to it")
                self._on_done()
        except (TimeoutError, OSError) as exc:
            log.warning("handover failed: %s", exc)
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class Takeover:
    """In a new agent: the sockets received from the running agent, and the DONE to send when ready."""

    def __init__(self, conn: socket.socket, sockets: dict[int, socket.socket]) -> None:
        self._conn = conn
        self.sockets = sockets

    def take(self, port: int) -> socket.socket | None:
        return self.sockets.pop(port, None)

    def done(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.sendall(b"DONE\n")
        self.close()

    def close(self) -> None:
        for sock in self.sockets.values():  # sockets we did not use go back to nobody
            sock.close()
        self.sockets.clear()
        self._conn.close()


def take_over(path: Path, timeout_s: float = 10.0) -> Takeover | None:
    """Ask a running agent for its listening sockets; None when no agent answers on `path`."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout_s)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    conn.sendall(b"TAKEOVER\n")
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, MAX_FDS)
    while not data.endswith(b"\n"):
        more = conn.recv(65536)
        if not more:
            break
        data += more
    ports = json.loads(data)["ports"]
    if len(ports) != len(fds):
        for fd in fds:
            os.close(fd)
        conn.close()
        raise RuntimeError(f"handover: manifest names {len(ports)} sockets, received {len(fds)}")
    sockets = {int(port): socket.socket(fileno=fd) for port, fd in zip(ports, fds, strict=True)}
    log.info("handover: took %d listening sockets (ports %s)", len(sockets), ", ".join(map(str, sockets)))
    return Takeover(conn, sockets)
