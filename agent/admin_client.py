"""The CLI side of the admin endpoint: `planemesh status | planes | stats | config-dump`.

A thin client: every command is one GET on the agent's admin socket (`--admin`, env `PLANEMESH_ADMIN`,
default `unix:///run/planemesh/admin.sock`). Commands return an exit code: 0 fine, 1 the agent answered
but is not ready / had no config, 2 the agent could not be reached or answered garbage.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from planemesh.agent.admin import DEFAULT_ADMIN_SOCKET, AdminBindError, parse_admin_bind
from planemesh.model.defaults import option

ADMIN_ENV = "PLANEMESH_ADMIN"  # the agent's endpoints, comma-separated: a client uses the first
DEFAULT_ADMIN = f"unix://{DEFAULT_ADMIN_SOCKET}"


def first_admin(value: str) -> str:
    """The endpoint a client talks to, of a PLANEMESH_ADMIN list the agent binds all of."""
    return value.split(",")[0].strip() or DEFAULT_ADMIN
TIMEOUT_S = 5.0

EXIT_OK, EXIT_NOT_READY, EXIT_UNREACHABLE = 0, 1, 2


class AdminUnreachable(Exception):
    """The agent did not answer; the message says where we looked and why."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass(frozen=True, slots=True)
class AdminReply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class AdminClient:
    def __init__(self, target: str | None = None, timeout_s: float = TIMEOUT_S) -> None:
        self.target = target or first_admin(os.environ.get(ADMIN_ENV) or DEFAULT_ADMIN)
        self.bind = parse_admin_bind(self.target)  # the same loopback-only rule as the server
        self.timeout_s = timeout_s

    def _connection(self) -> http.client.HTTPConnection:
        if self.bind.unix_path is not None:
            return _UnixHTTPConnection(self.bind.unix_path, self.timeout_s)
        return http.client.HTTPConnection(self.bind.host or "127.0.0.1", self.bind.port, timeout=self.timeout_s)

    def get(self, path: str) -> AdminReply:
        conn = self._connection()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return AdminReply(resp.status, resp.getheader("Content-Type", ""), resp.read())
        except (OSError, http.client.HTTPException) as exc:
            raise AdminUnreachable(f"cannot reach the agent at {self.target}: {exc}") from exc
        finally:
            conn.close()

    def get_json(self, path: str) -> tuple[int, Any]:
        reply = self.get(path)
        try:
            return reply.status, reply.json()
        except ValueError as exc:
            raise AdminUnreachable(f"{self.target}{path} answered {reply.status} with non-JSON: {exc}") from exc


# ---- commands: each takes a client and an output stream, returns an exit code ---------------------------


def status(client: AdminClient, out: TextIO) -> int:
    code, st = client.get_json("/status")
    if code != 200:
        out.write(f"agent answered {code}\n")
        return EXIT_UNREACHABLE
    out.write(f"agent      pid {st['pid']}, up {st['uptime_s']:.0f}s, {'healthy' if st['healthy'] else 'UNHEALTHY'}\n")
    if st["ready"]:
        out.write("ready      yes\n")
    else:
        out.write("ready      no, waiting for: " + ", ".join(st["blockers"]) + "\n")
    out.write(f"config     {st['snapshot_version'] or 'none applied yet'}\n")
    out.write(f"planes     {', '.join(st['planes']) or '-'}\n")
    if st["xds_connected"] is not None:
        out.write(f"xds        {'connected' if st['xds_connected'] else 'DISCONNECTED'}\n")
    for type_url, version in sorted(st["xds_versions"].items()):
        out.write(f"  {type_url.rsplit('/', 1)[-1]:<40} {version}\n")
    return EXIT_OK if st["ready"] and st["healthy"] else EXIT_NOT_READY


def planes(client: AdminClient, out: TextIO, as_json: bool = False) -> int:
    code, body = client.get_json("/planes")
    if code != 200:
        out.write(f"{body.get('error', code)}\n")
        return EXIT_NOT_READY
    if as_json:
        out.write(json.dumps(body, indent=2, sort_keys=True) + "\n")
        return EXIT_OK
    out.write(f"{'PLANE':<12} {'ID':>3} {'PROXY':>6} {'CONNS':>6} {'REQS':>8}  INTERFACES / CIDRS\n")
    for p in body["planes"]:
        ifaces = ", ".join(
            f"{i['name']}{'' if i.get('attached') else ' (not attached)'}" for i in p["interfaces"]
        ) or "patterns " + " ".join(p["interface_patterns"])
        counters = p["counters"]
        out.write(
            f"{p['name']:<12} {p['id']:>3} {p['proxy_port']:>6} {counters['active_connections']:>6} "
            f"{counters['http_requests']:>8}  {ifaces}\n"
        )
        out.write(f"{'':<39}  {' '.join(p['cidrs'])}\n")
        if counters["bpf_packets"]:
            verdicts = " ".join(f"{k}={v}" for k, v in sorted(counters["bpf_packets"].items()))
            out.write(f"{'':<39}  packets: {verdicts}\n")
    return EXIT_OK


def _metric_name(line: str) -> str:
    if line.startswith("#"):
        parts = line.split(" ", 3)  # "# HELP name text" / "# TYPE name kind"
        return parts[2] if len(parts) > 2 else ""
    return line.split("{", 1)[0].split(" ", 1)[0]


def stats(client: AdminClient, out: TextIO, prefix: str = "", as_json: bool = False) -> int:
    reply = client.get("/stats?format=json" if as_json else "/stats")
    if reply.status != 200:
        out.write(f"agent answered {reply.status}: {reply.body.decode(errors='replace')}")
        return EXIT_UNREACHABLE
    text = reply.body.decode()
    if prefix and not as_json:
        text = "".join(f"{line}\n" for line in text.splitlines() if prefix in _metric_name(line))
    out.write(text)
    return EXIT_OK


def config_dump(client: AdminClient, out: TextIO) -> int:
    code, body = client.get_json("/config_dump")
    out.write(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return EXIT_OK if code == 200 else EXIT_NOT_READY


# ---- argparse wiring ------------------------------------------------------------------------------------


def _run(func: Any, args: argparse.Namespace, **kwargs: Any) -> int:
    out = sys.stdout
    try:
        client = AdminClient(args.admin)
        return func(client, out, **kwargs)
    except AdminBindError as exc:
        sys.stderr.write(f"planemesh: --admin: {exc}\n")
    except AdminUnreachable as exc:
        sys.stderr.write(f"planemesh: {exc}\n")
    return EXIT_UNREACHABLE


def add_admin_commands(subparsers: Any) -> None:
    """Register status, planes, stats, config-dump; each sets `args.func(args) -> int`."""

    def admin_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("--admin", type=first_admin, **option(name, "--admin"))
        return parser

    p = admin_parser("status", "readiness, health, config and xDS versions of the running agent")
    p.set_defaults(func=lambda a: _run(status, a))
    p = admin_parser("planes", "the planes with their interfaces, addresses and counters")
    p.add_argument("--json", action="store_true", **option("planes", "--json"))
    p.set_defaults(func=lambda a: _run(planes, a, as_json=a.json))
    p = admin_parser("stats", "the agent's metrics (Prometheus text format)")
    p.add_argument("--filter", **option("stats", "--filter"))
    p.add_argument("--json", action="store_true", **option("stats", "--json"))
    p.set_defaults(func=lambda a: _run(stats, a, prefix=a.filter, as_json=a.json))
    p = admin_parser("config-dump", "the live configuration snapshot as JSON")
    p.set_defaults(func=lambda a: _run(config_dump, a))
