"""A real admin server on a unix socket and 127.0.0.1, its event loop in a thread, for blocking clients."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from planemesh.agent.admin import AdminApp, AdminServer
from planemesh.agent.sdnotify import Readiness
from planemesh.agent.stats_report import StatsRegistry
from planemesh.model.config import Snapshot
from planemesh.model.static_config import load_default_config


@dataclass
class LiveAdmin:
    app: AdminApp
    server: AdminServer
    readiness: Readiness
    stats: StatsRegistry
    state: dict[str, Any]  # "snapshot": Snapshot | None, "healthy": bool
    unix_path: str
    tcp_port: int

    def unix_get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        return _exchange(UnixHTTPConnection(self.unix_path), path, method)

    def tcp_get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        return _exchange(http.client.HTTPConnection("127.0.0.1", self.tcp_port, timeout=5), path, method)


def _exchange(conn: http.client.HTTPConnection, path: str, method: str) -> tuple[int, dict[str, str], bytes]:
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self._path)


@pytest.fixture
def event_loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="admin-test-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.fixture
def default_snapshot() -> Snapshot:
    return load_default_config()


@pytest.fixture
def live_admin(tmp_path, event_loop_thread, default_snapshot) -> Iterator[LiveAdmin]:
    readiness = Readiness()
    stats = StatsRegistry()
    state: dict[str, Any] = {"snapshot": None, "healthy": True}
    app = AdminApp(
        readiness=readiness,
        stats=stats,
        snapshot=lambda: state["snapshot"],
        is_healthy=lambda: state["healthy"],
    )
    unix_path = str(tmp_path / "run" / "admin.sock")
    server = AdminServer(app, [f"unix://{unix_path}", "127.0.0.1:0"])
    asyncio.run_coroutine_threadsafe(server.start(), event_loop_thread).result(5)
    port = int(server.addresses[1].rsplit(":", 1)[1])
    try:
        yield LiveAdmin(app, server, readiness, stats, state, unix_path, port)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), event_loop_thread).result(5)
