"""Real backends and a real proxy on loopback for the proxy tests.

The backend is a threaded http.server; the proxy runs on its own uvloop thread. Everything binds to
127.0.0.1 / ::1 only and is torn down by the fixtures even when a test fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import socket
import threading
import time
from dataclasses import replace
from types import MappingProxyType
from typing import Self

import uvloop

from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.model.config import (
    Cluster,
    ClusterKind,
    Endpoint,
    Listener,
    ListenerProtocol,
    Route,
    RouteAction,
    RouteConfig,
    Snapshot,
    VirtualHost,
)
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import SLA, Plane
from tests.support.net import free_port  # noqa: F401  (re-exported: tests import it from here)

PLANE = "oam"


class BackendHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Backend

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle + delayed ACK add 40 ms per response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _record(self) -> None:
        self.server.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status not in (204, 304):
            self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._record()
        self._send(200, b"x" * 1234)

    def do_POST(self) -> None:
        self._record()
        body = self._read_body()
        if self.path.startswith("/echo"):
            self._send(200, body, {"x-body-sha256": hashlib.sha256(body).hexdigest()})
        else:
            self._send(200, hashlib.sha256(body).hexdigest().encode())

    do_PUT = do_POST

    def do_GET(self) -> None:
        self._record()
        path = self.path
        if path.startswith("/big"):  # /big/<bytes>: chunked, deterministic content
            size = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.send_header("x-body-sha256", hashlib.sha256(big_body(size)).hexdigest())
            self.end_headers()
            body = big_body(size)
            for i in range(0, size, 65536):
                part = body[i : i + 65536]
                self.wfile.write(b"%x\r\n%b\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif path.startswith("/slow"):
            time.sleep(float(path.split("/")[2]))
            self._send(200, b"slow\n")
        elif path.startswith("/status/"):
            self._send(int(path.split("/")[2]), b"status\n")
        elif path.startswith("/fail-once/"):  # 503 the first time a key is seen, 200 afterwards
            first = path not in self.server.failed_once
            self.server.failed_once.add(path)
            self._send(503 if first else 200, b"first\n" if first else b"second\n")
        elif path.startswith("/reset"):  # close without any response
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif path == "/204":
            self._send(204, b"")
        elif path == "/304":
            self._send(304, b"", {"etag": '"v1"'})
        elif path == "/headers":
            rid = self.headers.get("x-request-id", "")
            self._send(200, rid.encode(), {"x-seen-xff": self.headers.get("x-forwarded-for", "")})
        else:
            self._send(200, f"hello {path}\n".encode())


def big_body(size: int) -> bytes:
    block = hashlib.sha256(str(size).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


class ThreadedBackend(http.server.ThreadingHTTPServer):
    """A real HTTP server on an ephemeral loopback port, serving from its own thread inside `with`."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), handler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


class Backend(ThreadedBackend):
    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host, BackendHandler)
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.failed_once: set[str] = set()


def make_snapshot(proxy_port: int, endpoints: list[tuple[str, int]], *, sla: SLA | None = None,
                  routes: tuple[Route, ...] | None = None, clusters: dict[str, Cluster] | None = None) -> Snapshot:
    plane = Plane(name=PLANE, plane_id=1, interfaces=("lo",), cidrs=(IPNetwork("127.0.0.0/8"),),
                  proxy_port=proxy_port, sla=sla or SLA())
    backend = Cluster(name="backend", kind=ClusterKind.STATIC,
                      endpoints=tuple(Endpoint(address=a, port=p) for a, p in endpoints))
    rc = RouteConfig(name="rc", virtual_hosts=(
        VirtualHost(name="all", domains=("*",), routes=routes or (Route(action=RouteAction(cluster="backend")),)),
    ))
    listener = Listener(name="http", plane=PLANE, port=proxy_port, protocol=ListenerProtocol.HTTP, route_config="rc")
    return Snapshot(version="t1", planes=(plane,), listeners=(listener,), routes=MappingProxyType({"rc": rc}),
                    clusters=MappingProxyType({"backend": backend, **(clusters or {})}))


class ServingProxy:
    """A PlaneProxy accepting on `sock` in its own uvloop thread while inside `with`."""

    drain_s = 0.5
    after_drain_s = 0.0  # the loop keeps running this long after drain() (what drain closed is seen closing)

    def __init__(self, proxy: PlaneProxy, sock: socket.socket) -> None:
        self.proxy = proxy
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            await self.proxy.start(self.sock)
            self._ready.set()
            await self.proxy.wait_closed()
            await asyncio.sleep(self.after_drain_s)

        try:
            self.loop.run_until_complete(main())
        finally:
            self.loop.close()

    def __enter__(self) -> Self:
        self.thread.start()
        if not self._ready.wait(5):
            raise TimeoutError("proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.proxy.drain(self.drain_s), self.loop)
        try:
            fut.result(timeout=5)
        finally:
            self.thread.join(timeout=5)
            self.sock.close()


class ProxyThread(ServingProxy):
    """A PlaneProxy serving on 127.0.0.1 (or ::1) in its own uvloop thread."""

    def __init__(self, endpoints: list[tuple[str, int]], *, host: str = "127.0.0.1", sla: SLA | None = None,
                 routes: tuple[Route, ...] | None = None, clusters: dict[str, Cluster] | None = None,
                 **options: object) -> None:
        sock = make_listener_socket(0, transparent=False, host=host)
        self.host = host
        self.snapshot = make_snapshot(sock.getsockname()[1], endpoints, sla=sla, routes=routes, clusters=clusters)
        self.log_lines: list[str] = []
        proxy = PlaneProxy(self.snapshot, PLANE, access_log=self._sink, tick_s=0.05, **options)  # type: ignore[arg-type]
        super().__init__(proxy, sock)

    def _sink(self, text: str) -> None:
        self.log_lines.extend(text.splitlines())

    def call(self, fn, *args):  # run fn(*args) on the proxy's loop and return its result
        fut = asyncio.run_coroutine_threadsafe(_call(fn, *args), self.loop)
        return fut.result(timeout=5)

    def flush_log(self) -> list[str]:
        self.call(self.proxy.log.flush)
        return self.log_lines

    def update_sla(self, sla: SLA) -> None:
        plane = replace(self.snapshot.planes[0], sla=sla)
        self.call(self.proxy.update, replace(self.snapshot, planes=(plane,)))


async def _call(fn, *args):
    return fn(*args)


def log_line_for(px: ProxyThread, needle: str, timeout: float = 3.0) -> str:
    """The first access-log line of `px` containing `needle` (lines are flushed once per proxy tick)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in px.flush_log():
            if needle in line:
                return line
        time.sleep(0.02)
    raise AssertionError(f"no access-log line with {needle!r}: {px.log_lines}")
