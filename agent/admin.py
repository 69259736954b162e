"""The local admin endpoint: readiness, health, Prometheus stats, the live config, the planes.

A deliberately small HTTP/1.1 server (one request per connection, GET/HEAD only) bound only to a unix
socket and/or a loopback address: it exposes the whole configuration, so it must never listen on a
plane. `AdminApp.handle()` is the sans-IO core (method + target -> Response); `AdminServer` is the I/O.

Endpoints: /ready, /healthz, /status, /stats (Prometheus text; ?format=json for the merged report),
/config_dump, /planes. Everything JSON is UTF-8 with sorted keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from planemesh.agent.metrics import PlanemeshCollector
from planemesh.agent.metrics_text import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, ProcessCollector, generate_latest
from planemesh.agent.sdnotify import Readiness
from planemesh.agent.stats_report import StatsRegistry
from planemesh.model.config import Snapshot
from planemesh.model.snapshot_json import to_jsonable

log = logging.getLogger(__name__)

DEFAULT_ADMIN_SOCKET = "/run/planemesh/admin.sock"
DEFAULT_ADMIN_PORT = 15000
DEFAULT_ADMIN_BINDS = (f"unix://{DEFAULT_ADMIN_SOCKET}", f"127.0.0.1:{DEFAULT_ADMIN_PORT}")
MAX_REQUEST_HEAD = 16 * 1024
REQUEST_TIMEOUT_S = 5.0


class AdminBindError(ValueError):
    """An admin address we refuse (not loopback, malformed, or a socket path another agent serves)."""


@dataclass(frozen=True, slots=True)
class AdminBind:
    unix_path: str | None = None
    host: str | None = None
    port: int = DEFAULT_ADMIN_PORT

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix://{self.unix_path}"
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else f"{self.host}:{self.port}"


def parse_admin_bind(spec: str) -> AdminBind:
    """`unix:///run/planemesh/admin.sock`, `/path.sock`, `127.0.0.1:15000`, `[::1]:15000`, `localhost:15000`.

    Only loopback addresses are accepted: the admin endpoint exposes the whole configuration.
    """
    spec = spec.strip()
    if spec.startswith("unix://"):
        spec = spec[len("unix://") :]
        if not spec.startswith("/"):
            raise AdminBindError(f"admin socket path must be absolute, got {spec!r}")
        return AdminBind(unix_path=spec)
    if spec.startswith("/"):
        return AdminBind(unix_path=spec)
    if spec.startswith("http://"):
        spec = spec[len("http://") :].rstrip("/")
    host, sep, port_text = spec.rpartition(":")
    if not sep or not host:
        raise AdminBindError(f"admin address {spec!r} is not unix:///path, HOST:PORT or [V6]:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise AdminBindError(f"admin address {spec!r}: {port_text!r} is not a port number") from None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise AdminBindError(f"admin address {spec!r}: {host!r} is not an IP address (or localhost)") from None
    if not ip.is_loopback:
        raise AdminBindError(
            f"refusing to bind the admin endpoint to non-loopback address {host}: it exposes the whole "
            "configuration; use 127.0.0.1, [::1] or a unix socket"
        )
    return AdminBind(host=str(ip), port=port)


# ---- sans-IO core -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}  # fmt: skip


def _json(status: int, value: Any) -> Response:
    return Response(status, (json.dumps(value, sort_keys=True, indent=1) + "\n").encode(), "application/json")


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode())


@dataclass(frozen=True, slots=True)
class PlaneInterface:
    """What netplanes reports about one interface of a plane (the `interfaces` provider's rows)."""

    name: str
    ifindex: int
    addresses: tuple[str, ...] = ()
    attached: bool = False  # TC program attached
    netns: str = ""  # "" for the agent's own namespace


InterfacesProvider = Callable[[], Mapping[str, Sequence[PlaneInterface | Mapping[str, Any]]]]


@dataclass
class AdminApp:
    """Answers admin requests from the daemon's live state, read through callables at request time."""

    readiness: Readiness
    stats: StatsRegistry = field(default_factory=StatsRegistry)
    snapshot: Callable[[], Snapshot | None] = lambda: None
    interfaces: InterfacesProvider | None = None
    is_healthy: Callable[[], bool] = lambda: True
    started_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(PlanemeshCollector(self.stats, lambda: self.readiness.blockers))
        ProcessCollector(registry=self.registry)
        self._routes: dict[str, Callable[[dict[str, list[str]]], Response]] = {
            "/ready": self._ready,
            "/healthz": self._healthz,
            "/status": self._status,
            "/stats": self._stats,
            "/config_dump": self._config_dump,
            "/planes": self._planes,
        }

    def handle(self, method: str, target: str) -> Response:
        if method not in ("GET", "HEAD"):
            return _text(405, f"{method} not allowed: the admin endpoint is read-only\n")
        parts = urlsplit(target)
        handler = self._routes.get(parts.path.rstrip("/") or "/")
        if handler is None:
            return _text(404, "endpoints: " + " ".join(sorted(self._routes)) + "\n")
        try:
            return handler(parse_qs(parts.query))
        except Exception as exc:
            log.exception("admin %s failed", parts.path)
            return _text(500, f"{parts.path} failed: {type(exc).__name__}: {exc}\n")

    def _ready(self, query: dict[str, list[str]]) -> Response:
        blockers = self.readiness.blockers
        if query.get("format") == ["json"]:
            return _json(503 if blockers else 200, {"ready": not blockers, "blockers": list(blockers)})
        if not blockers:
            return _text(200, "ready\n")
        return _text(503, "not ready, waiting for:\n" + "".join(f"  {b}\n" for b in blockers))

    def _healthy(self) -> bool:
        try:
            return bool(self.is_healthy())
        except Exception:
            log.exception("liveness check raised")
            return False

    def _healthz(self, _query: dict[str, list[str]]) -> Response:
        return _text(200, "ok\n") if self._healthy() else _text(503, "unhealthy\n")

    def _xds_versions(self) -> tuple[dict[str, str], bool | None]:
        report = self.stats.gather()
        return {row.type_url: row.version for row in report.xds}, report.xds_connected

    def _status(self, _query: dict[str, list[str]]) -> Response:
        snap = self.snapshot()
        versions, connected = self._xds_versions()
        return _json(200, {
            "ready": self.readiness.ready,
            "blockers": list(self.readiness.blockers),
            "healthy": self._healthy(),
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "snapshot_version": snap.version if snap else None,
            "planes": [p.name for p in snap.planes] if snap else [],
            "xds_connected": connected,
            "xds_versions": versions,
        })  # fmt: skip

    def _stats(self, query: dict[str, list[str]]) -> Response:
        if query.get("format") == ["json"]:
            return _json(200, to_jsonable(self.stats.gather()))
        # 0.0.4: every Prometheus and scraper understands it; our names need no 1.0.0 escaping.
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4)

    def _config_dump(self, _query: dict[str, list[str]]) -> Response:
        snap = self.snapshot()
        if snap is None:
            return _json(503, {"error": "no configuration applied yet"})
        versions, _ = self._xds_versions()
        return _json(200, {"version": snap.version, "xds_versions": versions, "snapshot": to_jsonable(snap)})

    def _planes(self, _query: dict[str, list[str]]) -> Response:
        snap = self.snapshot()
        if snap is None:
            return _json(503, {"error": "no configuration applied yet"})
        return _json(200, {"version": snap.version, "planes": plane_views(snap, self._interfaces(), self.stats)})

    def _interfaces(self) -> dict[str, list[dict[str, Any]]]:
        if self.interfaces is None:
            return {}
        try:
            raw = self.interfaces()
        except Exception:
            log.exception("interfaces provider failed")
            return {}
        return {plane: [to_jsonable(i) for i in rows] for plane, rows in raw.items()}


def plane_views(
    snap: Snapshot, interfaces: Mapping[str, list[dict[str, Any]]], stats: StatsRegistry
) -> list[dict[str, Any]]:
    """Each plane as configured, with its live interfaces and its counters summed from the stats."""
    report = stats.gather()
    views = []
    for plane in snap.planes:
        packets: dict[str, int] = {}
        for row in report.datapath:
            if row.plane == plane.name:
                for verdict, n in row.packets.items():
                    packets[verdict] = packets.get(verdict, 0) + n
        listeners = [r for r in report.listeners if r.plane == plane.name]
        views.append({
            "name": plane.name,
            "id": plane.plane_id,
            "interface_patterns": list(plane.interfaces),
            "cidrs": [str(c) for c in plane.cidrs],
            "undeclared": plane.undeclared.value,
            "proxy_port": plane.proxy_port,
            "sniff_port": plane.sniff_port,
            "sla": to_jsonable(plane.sla),
            "listeners": [{"name": x.name, "port": x.port, "protocol": x.protocol.value}
                          for x in snap.listeners_of(plane.name)],
            "interfaces": interfaces.get(plane.name, []),
            "counters": {
                "bpf_packets": packets,
                "active_connections": sum(r.active_connections for r in listeners),
                "connections": sum(r.connections for r in listeners),
                "rate_limited": sum(r.rate_limited for r in listeners),
                "http_requests": sum(r.requests for r in report.routes if r.plane == plane.name),
            },
        })  # fmt: skip
    return views


class BadRequest(Exception):
    """A request line we cannot parse: answered with 400, never raised further."""


def parse_request_head(head: bytes) -> tuple[str, str]:
    """The method and target of an HTTP/1.x request head (headers are read and ignored)."""
    line, _, _ = head.partition(b"\r\n")
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest(f"malformed request line {line[:80]!r}") from None
    if not version.startswith("HTTP/1.") or not target.startswith("/") or not method.isalpha():
        raise BadRequest(f"malformed request line {line[:80]!r}")
    return method, target


def render_response(resp: Response, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Status')}\r\n"
        f"Content-Type: {resp.content_type}\r\nContent-Length: {len(resp.body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + resp.body


# ---- I/O ---------------------------------------------------------------------------------------------


def _prepare_unix_path(path: str) -> None:
    """Create the directory; remove a stale socket, but never one a running agent still answers on."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AdminBindError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise AdminBindError(f"cannot probe existing admin socket {path}: {exc}") from exc
        target.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise AdminBindError(f"another process is serving {path}; is an agent already running?")


class AdminServer:
    """Serves an AdminApp on the given binds. `await start()`, then `close()`; or `await run()` in a task group."""

    def __init__(self, app: AdminApp, binds: Sequence[AdminBind | str] = DEFAULT_ADMIN_BINDS) -> None:
        self.app = app
        self.binds = [b if isinstance(b, AdminBind) else parse_admin_bind(b) for b in binds]
        for b in self.binds:  # an AdminBind built by hand gets the same check as a parsed one
            if b.host is not None and not ipaddress.ip_address(b.host).is_loopback:
                raise AdminBindError(f"refusing to bind the admin endpoint to non-loopback address {b.host}")
        if not self.binds:
            raise AdminBindError("the admin endpoint needs at least one bind address")
        self._servers: list[asyncio.Server] = []
        self._own_paths: dict[str, tuple[int, int]] = {}  # unix socket path -> (dev, inode) we bound
        self.addresses: list[str] = []  # what was actually bound (port 0 resolved)

    async def start(self) -> None:
        try:
            for b in self.binds:
                if b.unix_path is not None:
                    _prepare_unix_path(b.unix_path)
                    server = await asyncio.start_unix_server(self._serve, path=b.unix_path, limit=MAX_REQUEST_HEAD)
                    os.chmod(b.unix_path, 0o660)
                    st = os.lstat(b.unix_path)
                    self._own_paths[b.unix_path] = (st.st_dev, st.st_ino)
                    self.addresses.append(f"unix://{b.unix_path}")
                else:
                    server = await asyncio.start_server(
                        self._serve, host=b.host, port=b.port, reuse_address=True, limit=MAX_REQUEST_HEAD
                    )
                    host, port = server.sockets[0].getsockname()[:2]
                    self.addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
                self._servers.append(server)
        except BaseException:
            await self.close()
            raise
        log.info("admin endpoint listening on %s", ", ".join(self.addresses))

    async def close(self) -> None:
        # Unlink our socket files first, while still listening: a successor (hot upgrade) probing the path
        # finds it answered and waits, so it never binds a file we would then unlink (that left the new
        # agent without an admin socket). Only the file we bound (same inode) is removed.
        for path, ident in self._own_paths.items():
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == ident:
                    os.unlink(path)
        self._own_paths.clear()
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await server.wait_closed()
        self._servers.clear()
        self.addresses.clear()

    async def run(self) -> None:
        """Serve until cancelled (the daemon's task group cancels it on shutdown)."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                if len(head) > MAX_REQUEST_HEAD:
                    resp = _text(431, "request head too large\n")
                else:
                    method, target = parse_request_head(head)
                    head_only = method == "HEAD"
                    resp = self.app.handle(method, target)
            except asyncio.LimitOverrunError:
                resp = _text(431, "request head too large\n")
            except BadRequest as exc:
                resp = _text(400, f"{exc}\n")
            except (TimeoutError, asyncio.IncompleteReadError):
                resp = _text(408, "incomplete request\n")
            writer.write(render_response(resp, head_only))
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # the client went away; nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
