"""The HBONE node process: the composition root of the capture, the pool, the outbound and inbound listeners.

    planemesh hbone --config FILE [--stats FILE] [--netns NS] [--pin-dir DIR]
    python -m planemesh.agent.hbone ...   (the same)

FILE is either HBONE settings (agent/hbone/settings.py) or an agent configuration (static config or xDS
bootstrap) with an `hbone:` section (agent/hbone/section.py). The agent runs this process itself when its
configuration has that section (agent/hbone/supervisor.py). Runs in the node's network namespace.

Two ways to stop. SIGTERM (HBONE off: the agent stops for good, the section was removed): detach the capture,
then close the listeners and the pooled connections. SIGUSR1 (hand over: a hot upgrade, a restart, new settings,
or the agent died: the parent-death signal): close the listeners at once (15008 is free for the successor) but
leave the capture attached, its maps and program pinned, and let open tunnels finish (at most DRAIN_S). The
capture plane is fail-closed: while no capture listener exists a tunnelled SYN is dropped by the TC program,
never routed in plaintext; the successor re-uses the pinned program (nothing compiled) and its listener takes
new connections from its bind on.

Start-up order: certificates, the WDS table (with `wds:`), the 15008 listener, then the capture. Run by the
agent, the two listening sockets are inherited (--listen-fd, --capture-fd: agent/hbone/listeners.py) and a
successor's node serves them while its predecessor still does: a predecessor only hands over (capture left
attached), so its clean-up never removes the successor's. Standalone, it binds them itself, and the bind is
the hand-over lock: a second node attaches its capture only once the first released 15008.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import uvloop
from pyroute2 import netns

from planemesh.agent.hbone.authz import Authz
from planemesh.agent.hbone.capture import CaptureDatapath
from planemesh.agent.hbone.certs import CaCertSource, CertSource
from planemesh.agent.hbone.csr_certs import CsrCertSource
from planemesh.agent.hbone.inbound import Inbound
from planemesh.agent.hbone.listeners import CAPTURE, LISTEN, adopt
from planemesh.agent.hbone.outbound import Outbound, Pool
from planemesh.agent.hbone.routes import HboneConfigError, Routes
from planemesh.agent.hbone.section import settings_from_file
from planemesh.agent.hbone.settings import HboneSettings
from planemesh.agent.hbone.stats import HboneStats
from planemesh.agent.hbone.wds import Table, WdsState
from planemesh.agent.hbone.wds_client import WdsClient
from planemesh.agent.identity.ca import CertError
from planemesh.agent.identity.ca_files import read_ca
from planemesh.agent.libc_tuning import tune_malloc
from planemesh.aio import stop_tasks
from planemesh.model.config import ConfigError
from planemesh.model.defaults import option

log = logging.getLogger("planemesh.hbone")
STATS_PERIOD_S = 0.5
DRAIN_S = 30.0  # hand-over: open tunnels finish within this, then the old node exits
CERT_TIMEOUT_S = 30.0  # the node's own certificate from the CA (ca_api) before the listener can serve
WDS_INITIAL_S = 10.0  # the first WDS answer before the node says ready (else it starts with the static table)
EXIT_CONFIG, EXIT_BIND = 2, 3
PR_SET_PDEATHSIG = 1


def load_settings(path: Path) -> HboneSettings:
    return settings_from_file(path)


def _write_stats_now(stats: HboneStats, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats.as_dict()))
    os.replace(tmp, path)


async def _write_stats(stats: HboneStats, path: Path) -> None:
    while True:
        _write_stats_now(stats, path)
        await asyncio.sleep(STATS_PERIOD_S)


async def cert_source(settings: HboneSettings) -> tuple[CertSource, CsrCertSource | None]:
    if settings.ca_api is not None:
        csr = CsrCertSource(settings.ca_api, settings.identity, set(settings.routes.workloads.values()))
        await csr.start(CERT_TIMEOUT_S)
        return csr, csr
    assert settings.ca_dir is not None
    return CaCertSource(read_ca(settings.ca_dir), settings.identity, settings.cert_ttl_s), None


async def serve(
    settings: HboneSettings, stats_path: Path | None, ready: str | None = None, *, pin_dir: str | None = None,
    capture: bool = False, shared_routing: bool = False, sockets: dict[str, socket.socket] | None = None,
) -> None:  # fmt: skip
    """Run until SIGTERM/SIGINT. `capture`: attach the TC capture here (after the listener is bound).
    `sockets`: listening sockets inherited from the agent (LISTEN, CAPTURE); those missing are bound here."""
    sockets = sockets or {}
    certs, csr = await cert_source(settings)
    stats = HboneStats()
    live = Live(settings.routes)
    live.csr = csr
    inbound = Inbound(lambda: live.routes, lambda: settings.rbacs, certs, stats, authz=lambda: live.authz)
    # WDS first: the inbound's local pods and the capture's rules are complete before either serves (during a
    # hot upgrade the predecessor's node keeps accepting on the same sockets meanwhile)
    wds = await start_wds(settings, live, stats) if settings.wds is not None else None
    try:
        await inbound.start(*settings.listen, sock=sockets.get(LISTEN))  # OSError (in use): exit EXIT_BIND
    except BaseException:
        if wds is not None:
            wds.cancel()
        raise
    datapath = None
    outbound = None
    handover = asyncio.Event()
    try:
        if settings.capture is not None:
            if capture:
                routes = live.routes
                # a thread: pyroute2's IPRoute runs an event loop of its own
                datapath = await asyncio.to_thread(
                    CaptureDatapath, settings.capture, routes, pin_dir, not shared_routing
                )
                how = "compiled" if datapath.compiled else "re-used from its pins: nothing compiled"
                log.info("HBONE capture attached (fail-closed), program %s", how)
            outbound = Outbound(live.routes, Pool(certs, stats), stats)
            await outbound.start(settings.capture.port, sock=sockets.get(CAPTURE))
        await live.attach(outbound, datapath)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, lambda: (handover.set(), stop.set()))
        writer = loop.create_task(_write_stats(stats, stats_path)) if stats_path else None
        log.info("HBONE node %s listening on %s:%d", settings.identity, *settings.listen)
        print(ready or "hbone ready", flush=True)
        await stop.wait()
        if handover.is_set():
            await _hand_over(inbound, outbound)
        await stop_tasks(writer)
    finally:
        await stop_tasks(wds, live.applier)
        if datapath is not None:  # first: new pod connections stop being captured before the listeners go
            await asyncio.to_thread(datapath.close, not handover.is_set())
        if outbound is not None:
            await outbound.close()
        await inbound.close()
        if csr is not None:
            await csr.close()
    if stats_path:
        _write_stats_now(stats, stats_path)


class Live:
    """The tables a running node serves: static settings, replaced by WDS updates without a restart."""

    def __init__(self, routes: Routes) -> None:
        self.routes = routes
        self.authz: Authz | None = None
        self.outbound: Outbound | None = None
        self.datapath: CaptureDatapath | None = None
        self.applier: asyncio.Task | None = None
        self.csr: CsrCertSource | None = None
        self._pending: Table | None = None
        self._lock = asyncio.Lock()  # one capture-rule sync at a time
        self._synced: Routes | None = None  # the routes the capture's rules were made from

    async def attach(self, outbound: Outbound | None, datapath: CaptureDatapath | None) -> None:
        """The outbound and capture now exist: from here on WDS updates reach them; catch up on any missed."""
        self.outbound, self.datapath = outbound, datapath
        if outbound is not None:
            outbound.routes = self.routes
        if datapath is not None:
            self._synced = datapath.routes
            await self._sync()

    async def _sync(self) -> None:
        async with self._lock:
            if self.datapath is not None and self._synced is not self.routes:
                routes = self.routes
                await asyncio.to_thread(self.datapath.update_routes, routes)
                self._synced = routes

    def on_table(self, table: Table) -> None:
        """From the WDS client: the newest table wins; applied in order by one task."""
        self._pending = table
        if self.applier is None or self.applier.done():
            self.applier = asyncio.get_running_loop().create_task(self._apply())

    async def _apply(self) -> None:
        while (table := self._pending) is not None:
            self._pending = None
            # Routes first: a connection the new capture rules catch finds its peer.
            self.routes, self.authz = table.routes, table.authz
            if self.csr is not None:  # CreateCertificate: a certificate for each workload identity learned
                self.csr.want(set(table.routes.workloads.values()))
            if self.outbound is not None:
                self.outbound.routes = table.routes
            await self._sync()
            log.info("HBONE table from WDS: %d local workloads, %d peer routes, %d policies",
                     len(table.routes.workloads), sum(len(p.cidrs) for p in table.routes.peers),
                     len(table.authz.policies))  # fmt: skip


async def start_wds(settings: HboneSettings, live: Live, stats: HboneStats) -> asyncio.Task:
    """The WDS stream (agent/hbone/wds_client.py); waits up to WDS_INITIAL_S for both types' first answer
    (ztunnel waits for its initial xDS too): the node then says ready with its table complete."""
    assert settings.wds is not None
    state = WdsState(f"planemesh-hbone~{settings.wds.node}", settings.wds.node, settings.routes)
    client = WdsClient(settings.wds, state, live.on_table, stats)
    task = asyncio.get_running_loop().create_task(client.run())
    try:
        async with asyncio.timeout(WDS_INITIAL_S):
            await client.received.wait()
    except TimeoutError:
        log.error("WDS: no answer from %s within %.0fs; serving the static table meanwhile",
                  settings.wds.address, WDS_INITIAL_S)  # fmt: skip
    if live.applier is not None:
        await asyncio.shield(live.applier)
    return task


async def _hand_over(inbound: Inbound, outbound: Outbound | None) -> None:
    """Release both listening ports now (the successor binds them), keep serving open tunnels until they end."""
    servers = [inbound.server, outbound.server if outbound else None]
    for server in servers:
        if server is not None:
            server.close()
    for conn in list(inbound.open):
        conn.drain()  # peers open their next tunnels to the node that took over
    log.info("HBONE node handing over: listeners closed, GOAWAY to peers, capture left attached; draining open tunnels")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_S
    while open_tunnels(inbound, outbound) and loop.time() < deadline:
        await asyncio.sleep(0.1)


def open_tunnels(inbound: Inbound, outbound: Outbound | None) -> int:
    conns = [c for held in (outbound.pool.conns.values() if outbound else ()) for _, c in held]
    return sum(len(c.streams) for c in [*conns, *inbound.open])


def _die_with_parent() -> None:
    """Supervised by the agent: go when it goes, even on SIGKILL (as its proxy workers do), by handing over:
    the capture stays attached and fail-closed until the next agent's node takes it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)
    if os.getppid() == 1:
        sys.exit(0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag in ("--config", "--stats", "--pin-dir", "--netns"):
        parser.add_argument(flag, **option("hbone", flag))
    for flag in ("--listen-fd", "--capture-fd"):
        parser.add_argument(flag, type=int, **option("hbone", flag))
    parser.add_argument("--shared-routing", action="store_true", **option("hbone", "--shared-routing"))
    parser.add_argument("--supervised", action="store_true", **option("hbone", "--supervised"))


def run(args: argparse.Namespace) -> int:
    if args.supervised:
        _die_with_parent()
    if not args.config:
        print("planemesh hbone: --config is required", file=sys.stderr)
        return EXIT_CONFIG
    if args.netns:
        netns.setns(args.netns)  # the whole process, before any socket or thread exists
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    tune_malloc()
    try:
        settings = load_settings(Path(args.config))
        if settings.ca_dir is not None:
            read_ca(settings.ca_dir)  # a missing or expired CA is a clear exit 2, not a traceback
    except (HboneConfigError, ConfigError, CertError, OSError) as exc:
        print(f"planemesh-hbone: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stats = Path(args.stats) if args.stats else None
    try:
        sockets = inherited(args)
    except (OSError, ValueError) as exc:
        print(f"planemesh-hbone: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        uvloop.run(serve(settings, stats, pin_dir=args.pin_dir, capture=True, shared_routing=args.shared_routing,
                         sockets=sockets))  # fmt: skip
    except OSError as exc:
        print(f"planemesh-hbone: {exc} (a port in use? HBONE {settings.listen[1]}, capture"
              f" {settings.capture.port if settings.capture else '-'})", file=sys.stderr)  # fmt: skip
        return EXIT_BIND
    except TimeoutError:
        print(f"planemesh-hbone: no certificate for {settings.identity} from the CA", file=sys.stderr)
        return EXIT_BIND
    return 0


# Not read from __doc__: product processes run with -OO (planemesh.module_argv), which drops docstrings.
DESCRIPTION = "The HBONE node process: the capture, the pool, the outbound and inbound listeners."


def inherited(args: argparse.Namespace) -> dict[str, socket.socket]:
    """The listening sockets the agent passed (--listen-fd, --capture-fd)."""
    fds = {LISTEN: args.listen_fd, CAPTURE: args.capture_fd}
    return {name: adopt(fd) for name, fd in fds.items() if fd is not None}


def add_hbone_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hbone", help="run an HBONE node (node-to-node mTLS) standalone; the agent runs it itself")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="planemesh-hbone", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
