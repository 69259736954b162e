"""Hot upgrade: a new agent takes the listening sockets from the running one, which then drains.

The running agent serves a unix socket (<runtime>/handover.sock). A new agent connects and sends
TAKEOVER; the old one answers with a manifest (port per listening socket) and the sockets themselves
(SCM_RIGHTS). The kernel keeps one listening socket per port throughout, so the data path always finds a
listener. When the new agent is ready it sends DONE: the old one stops accepting, finishes in-flight
requests and exits *without* detaching programs or routes (they belong to the new agent now).

Named sockets (the HBONE node's 15008 and capture listeners, agent/hbone/listeners.py) travel in the same
message: they are listed in `ports` too (by their port) and `named` maps each name to its index, so an agent
that does not know names takes them as unused ports and closes them, and one that does takes them by name.
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

    def __init__(
        self, path: Path, listeners: Callable[[], dict[int, socket.socket]], on_done: Callable[[], None],
        named: Callable[[], dict[str, socket.socket]] | None = None,
    ):  # fmt: skip
        self.path = path
        self._listeners = listeners
        self._named = named or dict
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
            async with asyncio.timeout(10):
                line = await reader.readline()
            if line.strip() != b"TAKEOVER":
                return
            listeners, extra = self._listeners(), self._named()
            socks = [*listeners.values(), *extra.values()]
            ports = [*listeners, *(s.getsockname()[1] for s in extra.values())]
            named = {name: len(listeners) + i for i, name in enumerate(extra)}
            manifest = json.dumps({"ports": ports, "named": named}).encode() + b"\n"
            raw = writer.get_extra_info("socket")
            with contextlib.suppress(Exception):
                await writer.drain()
            # send_fds on the underlying socket: asyncio streams cannot carry ancillary data.
            dup = socket.socket(fileno=os.dup(raw.fileno()))
            try:
                dup.setblocking(True)
                _send_fds(dup, manifest, [s.fileno() for s in socks])
            finally:
                dup.close()
            log.info("handover: sent %d listening sockets to a new agent (named: %s)", len(socks),
                     ", ".join(named) or "none")  # fmt: skip
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

    def __init__(
        self, conn: socket.socket, sockets: dict[int, socket.socket], named: dict[str, socket.socket] | None = None
    ) -> None:
        self._conn = conn
        self.sockets = sockets
        self.named = named or {}

    def take(self, port: int) -> socket.socket | None:
        return self.sockets.pop(port, None)

    def take_named(self, *names: str) -> dict[str, socket.socket]:
        """The named sockets among `names` that the predecessor sent (ours from now on)."""
        return {name: self.named.pop(name) for name in names if name in self.named}

    def done(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.sendall(b"DONE\n")
        self.close()

    def close(self) -> None:
        for sock in [*self.sockets.values(), *self.named.values()]:  # sockets we did not use go back to nobody
            sock.close()
        self.sockets.clear()
        self.named.clear()
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
    manifest = json.loads(data)
    ports = manifest["ports"]
    if len(ports) != len(fds):
        for fd in fds:
            os.close(fd)
        conn.close()
        raise RuntimeError(f"handover: manifest names {len(ports)} sockets, received {len(fds)}")
    by_index = {int(i): name for name, i in manifest.get("named", {}).items()}
    sockets: dict[int, socket.socket] = {}
    named: dict[str, socket.socket] = {}
    for i, (port, fd) in enumerate(zip(ports, fds, strict=True)):
        if i in by_index:
            named[by_index[i]] = socket.socket(fileno=fd)
        else:
            sockets[int(port)] = socket.socket(fileno=fd)
    log.info("handover: took %d listening sockets (ports %s; named: %s)", len(sockets) + len(named),
             ", ".join(map(str, sockets)), ", ".join(named) or "none")  # fmt: skip
    return Takeover(conn, sockets, named)
