"""A plane's proxy worker process: serves the plane's listening sockets, nothing else.

Started by the agent (agent/worker_supervisor.py) with the listening sockets and one end of a control
socketpair passed as file descriptors. Each plane runs in processes of its own so that one plane's CPU
saturation cannot starve another's. The worker dies with the agent (PR_SET_PDEATHSIG): the data path
then falls open to the original destinations instead of feeding a proxy nobody controls.
"""

from __future__ import annotations

# ruff: noqa: E402  (the imports below come after loading the loop, on purpose)
# First, before anything imports asyncio: uvloop without OpenSSL, ~4 MB of RSS less per worker (agent/lean_loop.py).
from planemesh.agent.lean_loop import import_uvloop_without_ssl

import_uvloop_without_ssl()

import asyncio
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from planemesh.agent.worker_channel import SnapshotDecoder, encode, read_message
from planemesh.model.config import Snapshot
from planemesh.model.planes import plane_of_address

log = logging.getLogger("planemesh.worker")
PR_SET_PDEATHSIG = 1


def die_with_parent(set_by_spawner: bool = False) -> None:
    """SIGTERM when the agent (or the zygote) goes. An exec'd worker usually has it set already by setpriv
    (agent/parent_death.py: no ctypes in the worker, ~0.35 MB of RSS); else it asks for it here."""
    if not set_by_spawner:
        import ctypes  # only where setpriv could not set it (an old util-linux), or in the zygote, which has it

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent already went before it was set
        sys.exit(0)


def stats_report(plane: str, stats: Any, sniff: Any = None) -> dict[str, Any]:
    """A worker's plane counters as rows of the admin's StatsReport (agent/stats_report.py); `sniff`: the sniffing
    listener's SniffStats (agent/proxy/passthrough.py), None when the plane has none."""
    from planemesh.agent.proxy.stats import LATENCY_BUCKETS_MS

    d = stats.as_dict()
    return {
        **(sniff_rows(plane, sniff) if sniff is not None else {}),
        "routes": [
            {
                "plane": plane,
                "listener": plane,
                "route": "all",
                "cluster": "all",
                "requests": d["requests_total"],
                "responses": {k: v for k, v in d["responses"].items() if k != "none"},
                "request_bytes": d["bytes_rx"],
                "response_bytes": d["bytes_tx"],
                "response_flags": d["response_flags"],
                "latency": {
                    "bounds": tuple(b / 1000 for b in LATENCY_BUCKETS_MS),
                    "counts": list(d["latency_buckets"].values()),
                    "sum_s": d["latency_sum_ms"] / 1000,
                },
            }
        ],
        "listeners": [
            {
                "plane": plane,
                "listener": plane,
                "active_connections": d["downstream_active"],
                "connections": d["downstream_total"],
                "rate_limited": d["rate_limited"],
            }
        ],
        "overload": [overload_row(plane, d)],  # agent/proxy/overload.py (conn helper)
        "clusters": [
            {
                "plane": plane,
                "cluster": "all",
                "active_connections": d["upstream_active"],
                "connect_failures": d["upstream_connect_failures"],
                "retries": d["retries"],
                "circuit_breaker_overflows": {"requests": d["overloaded"]} if d["overloaded"] else {},
            }
        ],
    }


def overload_row(plane: str, d: dict[str, Any]) -> dict[str, Any]:
    """The overload manager and connection share of one worker (PlaneStats.as_dict()), as an OverloadStats row."""
    level = d["overload_level"]
    return {
        "plane": plane,
        "workers_soft": int(level >= 1),
        "workers_hard": int(level >= 2),
        "memory_bytes": d["memory_bytes"],
        "shed_requests": d["shed_requests"],
        "shed_connections": d["shed_connections"],
        "resets": d["overload_resets"],
        "source_refused": d["source_refused"],
        "idle_closed": d["idle_closed"],
    }


def sniff_rows(plane: str, sniff: Any) -> dict[str, Any]:
    s = sniff.as_dict()
    return {
        "sniff": [
            {
                "plane": plane,
                "verdicts": s["kinds"],
                "inner_verdicts": s["inner_kinds"],
                "sni": s["sni"],
                "alpn": s["alpn"],
                "silent_clients": s["silent_clients"],
                "passthrough_active": s["passthrough_active"],
                "passthrough_connections": s["passthrough_total"],
                "passthrough_bytes_up": s["bytes_up"],
                "passthrough_bytes_down": s["bytes_down"],
                "connect_failures": s["connect_failures"],
                "no_upstream": s["no_upstream"],
                "upstream_tls": s["origin"],  # TLS originated on relayed TCP (agent/proxy/tcp_originate.py)
            }
        ],
        "sni_routes": [
            {"plane": plane, "chain": chain, "sni": name, "connections": n}
            for chain, names in s["routed"].items()
            for name, n in names.items()
        ],
    }


class SourceAddresses:
    """Given an upstream IP, this node's own address on that IP's plane (so it leaves on that plane)."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.by_plane: dict[str, dict[int, str]] = {}

    def __call__(self, upstream_ip: str) -> str | None:
        if self.snapshot is None:
            return None
        plane = plane_of_address(self.snapshot.planes, upstream_ip)
        if plane is None:
            return None
        mapped = upstream_ip.startswith("::ffff:")
        version = 4 if ("." in upstream_ip and (mapped or ":" not in upstream_ip)) else 6
        return self.by_plane.get(plane.name, {}).get(version)


async def run_worker(
    plane: str, control: socket.socket, listeners: list[socket.socket], options: dict[str, Any]
) -> None:
    from planemesh.agent.proxy.accesslog import file_sink
    from planemesh.agent.proxy.server import PlaneProxy

    reader, writer = await asyncio.open_unix_connection(sock=control)
    decoder = SnapshotDecoder()  # unchanged routes and clusters arrive as the objects this worker already has
    first = await read_message(reader, decoder)
    if first is None or first.get("op") != "snapshot":
        raise RuntimeError("worker: the agent sent no initial snapshot")
    sources = SourceAddresses()
    sources.snapshot, sources.by_plane = first["snapshot"], first.get("sources", {})
    extra: dict[str, Any] = {}
    if options.get("host_map_fd") is not None:
        from planemesh.ebpf.host_redirect import OriginalDestinations

        # Host-mode connections arrive from loopback: their destination is in the agent's map, by peer.
        extra["original_destination"] = OriginalDestinations(options["host_map_fd"]).proxy_original_destination
    proxy = PlaneProxy(
        first["snapshot"],
        plane,
        # Own-traffic bit (the data path lets it pass) plus the plane id (per-plane egress classes).
        upstream_mark=options["upstream_mark"] | first["snapshot"].plane(plane).plane_id,
        source_address=sources,
        access_log=file_sink(options["access_log"]) if options.get("access_log") else None,
        **extra,
    )
    serving = [asyncio.create_task(proxy.serve(sock), name=f"serve-{sock.getsockname()[1]}") for sock in listeners]
    writer.write(encode({"op": "ready", "pid": os.getpid()}))
    await writer.drain()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def control_loop() -> None:
        while (msg := await read_message(reader, decoder)) is not None:
            op, rid = msg.get("op"), msg.get("id")  # every reply echoes the request's id
            if op == "snapshot":
                sources.snapshot, sources.by_plane = msg["snapshot"], msg.get("sources", {})
                proxy.update(msg["snapshot"])
                writer.write(encode({"op": "applied", "id": rid, "version": msg["snapshot"].version}))
            elif op == "stats":
                sniff = proxy.sniff_stats if proxy.sniffing else None
                report = stats_report(plane, proxy.stats, sniff)
                report["tls"] = [{"plane": plane, **proxy.tls_stats.as_dict()}]  # agent/proxy/tls.py
                report["istio"] = proxy.istio.report(plane)  # agent/proxy/istio_stats.py
                report["overload"][0]["node_shed_requests"] = proxy.overload.node_refused  # node_overload.py
                writer.write(encode({"op": "stats", "id": rid, "stats": report}))
            elif op == "shed":  # the node's overload: this plane's share to refuse (agent/node_overload.py)
                proxy.overload.set_node_shed(float(msg.get("fraction", 0.0)))
                writer.write(encode({"op": "shed_set", "id": rid}))
            elif op == "drain":
                await proxy.drain(float(msg.get("timeout", 10)))
                writer.write(encode({"op": "drained", "id": rid}))
                await writer.drain()
                return
            await writer.drain()

    control_task = asyncio.create_task(control_loop(), name="control")
    stop_task = asyncio.create_task(stop.wait(), name="signal")
    done, _ = await asyncio.wait([control_task, stop_task, *serving], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not stop_task and task is not control_task and task.exception():
            raise task.exception()  # type: ignore[misc]
    if stop_task in done:
        await proxy.drain(float(options.get("drain_timeout", 5)))
    for task in [*serving, control_task, stop_task]:
        task.cancel()
    await asyncio.gather(*serving, control_task, stop_task, return_exceptions=True)


USAGE = (
    "usage: planemesh-worker --plane NAME --control-fd N --upstream-mark MARK [--listen-fd N]... "
    "[--access-log PATH] [--drain-timeout S] [--host-map-fd N] [--pdeathsig set|self]"
)


@dataclass
class WorkerArgs:
    plane: str = ""
    control_fd: int = -1
    upstream_mark: int = -1
    listen_fd: list[int] = field(default_factory=list)
    access_log: str | None = None
    drain_timeout: float = 5.0
    host_map_fd: int | None = None  # host mode: the agent's pm_host_by_peer map
    pdeathsig: str = "self"  # "set": the spawner set PR_SET_PDEATHSIG already (agent/parent_death.py)


_CONVERT: dict[str, Any] = {
    "--plane": str, "--control-fd": int, "--upstream-mark": lambda v: int(v, 0), "--listen-fd": int,
    "--access-log": str, "--drain-timeout": float, "--host-map-fd": int,
    "--pdeathsig": lambda v: _one_of(v, "set", "self"),
}  # fmt: skip


def _one_of(value: str, *allowed: str) -> str:
    if value not in allowed:
        raise ValueError(value)
    return value


class UsageError(SystemExit):
    """A bad worker command line: exit code 2, as argparse's."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message
        print(f"{USAGE}\nplanemesh-worker: {message}", file=sys.stderr)

    def __str__(self) -> str:
        return self.message


def parse_args(argv: list[str]) -> WorkerArgs:
    """The worker's command line, written by the agent (worker_supervisor.WorkerProcess._argv). Parsed by hand:
    argparse (and gettext with it) would cost every worker ~0.6 MB of RSS (bench/footprint.py)."""
    args = WorkerArgs()
    if len(argv) % 2:
        raise UsageError(f"every option takes one value: {argv!r}")
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        if flag not in _CONVERT:
            raise UsageError(f"unknown option {flag!r}")
        try:
            converted = _CONVERT[flag](value)
        except ValueError:
            raise UsageError(f"bad value for {flag}: {value!r}") from None
        if flag == "--listen-fd":
            args.listen_fd.append(converted)
        else:
            setattr(args, flag[2:].replace("-", "_"), converted)
    if not args.plane or args.control_fd < 0 or args.upstream_mark < 0:
        raise UsageError("--plane, --control-fd and --upstream-mark are required")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    die_with_parent(set_by_spawner=args.pdeathsig == "set")
    logging.basicConfig(  # force: a worker forked by the zygote (agent/zygote.py) has the agent's handlers
        level=os.environ.get("PLANEMESH_LOG_LEVEL", "INFO"),
        format=f"%(levelname)s {args.plane}: %(message)s",
        force=True,
    )
    control = socket.socket(fileno=args.control_fd)
    listeners = [socket.socket(fileno=fd) for fd in args.listen_fd]
    options = {
        "upstream_mark": args.upstream_mark,
        "access_log": args.access_log,
        "drain_timeout": args.drain_timeout,
        "host_map_fd": args.host_map_fd,
    }
    try:
        import uvloop

        uvloop.run(run_worker(args.plane, control, listeners, options))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
