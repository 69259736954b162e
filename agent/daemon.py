"""The agent's composition root: builds every component, applies snapshots, runs until signalled.

Order of start-up (each step a readiness blocker): enter the node namespace, load the BPF program,
install policy routing, apply the first snapshot (maps, then workers with their listening sockets),
attach to every plane interface and (host mode) to the configured cgroups, start the netlink watch, serve
admin, notify systemd.
Order of shutdown: detach the host-mode programs (new connects from the node's own processes go direct),
stop accepting, drain workers, detach programs, remove routes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from typing import TYPE_CHECKING, Any

from planemesh.agent.agent_options import AgentOptions, options_from_args
from planemesh.agent.control_thread import ControlThread
from planemesh.agent.cpu_groups import CpuGroups
from planemesh.agent.handover import HandoverServer, Takeover, take_over
from planemesh.agent.hbone.listeners import NAMES as HBONE_SOCKETS
from planemesh.agent.hbone.load import load_hbone_section
from planemesh.agent.host_attach import load_host_cgroups, sync_cgroups
from planemesh.agent.kernel import KernelDataPath
from planemesh.agent.logs import FORMATS, LEVELS, configure_logging
from planemesh.agent.node_overload import NodeOverloadConfig, load_node_overload
from planemesh.agent.node_overload_loop import NodeOverloadLoop
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.agent.sdnotify import (
    FIRST_SNAPSHOT_APPLIED,
    LISTENERS_BOUND,
    PROGRAMS_ATTACHED,
    ROUTES_INSTALLED,
    Notifier,
    Readiness,
    run_watchdog,
)
from planemesh.agent.worker_stats import WorkerStats
from planemesh.agent.worker_supervisor import PlaneWorkers
from planemesh.agent.xds_source import bootstrap_for, start_xds, stop_xds
from planemesh.model.config import ConfigError, Snapshot
from planemesh.model.defaults import option
from planemesh.model.static_config import load_static_snapshot
from planemesh.netplanes import discovery, netns
from planemesh.netplanes.discovery import PlaneInterface
from planemesh.netplanes.link_monitor import LinkMonitor

if TYPE_CHECKING:  # the fork server's client is imported only with --worker-zygote (not the default): new_zygotes
    from planemesh.agent.zygote_client import Zygotes

log = logging.getLogger("planemesh.agent")
HBONE_READY_S = 60.0  # the HBONE node's first start (BPF load, certificates) before the agent says ready


class Agent:
    def __init__(
        self,
        options: AgentOptions,
        host_cgroups: tuple[str, ...] = (),
        node_overload: NodeOverloadConfig | None = None,
        hbone: dict[str, Any] | None = None,
        zygotes: Zygotes | None = None,
    ) -> None:
        self.options = options
        self.hbone_settings = hbone  # the checked `hbone:` section (agent/hbone/section.py); None: no HBONE
        self.hbone: Any = None  # planemesh.agent.hbone.supervisor.HboneSupervisor while it runs
        self.host_cgroups = host_cgroups  # host mode: real cgroup v2 paths (planemesh.agent.host_attach)
        self.host: Any = None  # planemesh.ebpf.host_redirect.HostMode, loaded at start when host mode is on
        self.snapshot: Snapshot | None = None
        self.interfaces: dict[int, PlaneInterface] = {}
        self.control = ControlThread()
        self.kernel = KernelDataPath(pin_dir=options.pin_dir)
        self.workers: dict[str, PlaneWorkers] = {}
        self.worker_stats = WorkerStats(self.workers)
        self.node_overload = NodeOverloadLoop(  # priority between planes (node_overload.py)
            node_overload or NodeOverloadConfig(), self.workers, self._plane_priorities, self.spawn,
            active=not options.datapath_only,
        )
        # The workers' fork server (agent/zygote.py; off: --no-worker-zygote); exec'd at the first worker unless given
        self.zygotes = zygotes if zygotes is not None or not options.worker_zygote else new_zygotes()
        self.cpu_groups = CpuGroups.create() if not options.datapath_only else CpuGroups(None)
        self.readiness = Readiness()
        self.notifier = Notifier()
        self.admin_app: Any = None
        self._admin: Any = None
        self.stopping = asyncio.Event()
        self._apply_lock = asyncio.Lock()
        self._iface_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self.failure: BaseException | None = None
        self.embedded_xds_server: Any = None
        self.handed_over = False  # a successor took our sockets: leave programs and routes to it
        self._takeover: Takeover | None = None
        self._handover_server: HandoverServer | None = None
        self.handover_path = options.handover or options.runtime_dir / f"handover-{options.netns or 'host'}.sock"
        self._watch: LinkMonitor | None = None
        self.xds_client: Any = None

    # ---- snapshots ---------------------------------------------------------------------------
    async def apply(self, snap: Snapshot) -> None:
        """Apply a validated snapshot as a diff; raises ConfigError (the caller NACKs) and keeps the old one."""
        async with self._apply_lock:
            old = self.snapshot
            await asyncio.to_thread(self.kernel.check, snap)  # everything that can fail, before any change (pure)
            seen = self.interfaces if old and old.planes == snap.planes else self._scan(snap)
            sources = discovery.plane_source_addresses(seen.values(), snap.planes)
            await self._apply_workers(old, snap, sources)
            await self.control.call(self.kernel.apply, snap)
            if self.host is not None:  # maps first, then (first snapshot) attach: listeners are up by now
                await self.control.call(self.host.apply_snapshot, snap)
                await self._sync_host_cgroups()
            self.snapshot = snap
            await self._sync_interfaces()
            if initial_fetch_done(snap):
                self.readiness.clear(FIRST_SNAPSHOT_APPLIED)
            log.info(
                "applied snapshot %s (%d planes, %d listeners)", snap.version, len(snap.planes), len(snap.listeners)
            )

    async def _apply_workers(self, old: Snapshot | None, snap: Snapshot, sources: dict[str, dict[int, str]]) -> None:
        if self.options.datapath_only:
            self.readiness.clear(LISTENERS_BOUND)
            return
        wanted = {p.name: p for p in snap.planes}
        for name in list(self.workers):
            plane_old = old.plane(name) if old else None
            plane_new = wanted.get(name)
            if plane_new is None or (plane_old and _listener_shape(plane_old) != _listener_shape(plane_new)):
                await self.workers.pop(name).stop(self.options.drain_timeout_s)
                if plane_new is None:
                    self.cpu_groups.remove_plane(name)
        for name, plane in wanted.items():
            sla = plane.sla
            self.cpu_groups.set_plane(name, sla.cpu_weight, sla.workers, sla.cpus, sla.memory_max_mb)
            if name in self.workers:
                await self.workers[name].update(snap, sources)
                continue
            # The sniffing listener is bound whether or not the kernel sends anything there yet: a pod whose
            # inspected TCP chain arrives or leaves changes the plane's BPF rules, never its workers.
            listeners = [self._listener(plane.proxy_port), self._listener(plane.sniff_port)]
            workers = PlaneWorkers(name, plane.sla.workers, listeners, self._worker_options(), self.cpu_groups)
            await workers.start(snap, sources)
            self.workers[name] = workers
            self.spawn(workers.supervise(), f"supervise-{name}")
        self.readiness.clear(LISTENERS_BOUND)

    def _listener(self, port: int) -> socket.socket:
        """The predecessor's listening socket for `port` when taking over (no gap), else a new one."""
        taken = self._takeover.take(port) if self._takeover is not None else None
        return taken if taken is not None else bind_listener(port)

    def listening_sockets(self) -> dict[int, socket.socket]:
        return {s.getsockname()[1]: s for pw in self.workers.values() for s in pw.listeners}

    def _hbone_sockets(self) -> dict[str, socket.socket]:
        """The HBONE node's listening sockets, for a successor agent (handover manifest's `named`)."""
        return dict(self.hbone.sockets) if self.hbone is not None else {}

    def _handed_over(self) -> None:
        self.handed_over = True
        self.stopping.set()

    def _worker_options(self) -> dict[str, Any]:
        return {
            "upstream_mark": self.kernel.own_mark,
            "access_log": self.options.access_log,
            "drain_timeout": self.options.drain_timeout_s,
            "host_map_fd": self.host.peer_map_fd if self.host is not None else None,
            "zygote": self.zygotes,
        }

    # ---- host mode ---------------------------------------------------------------------------
    async def _open_host_mode(self) -> None:
        # Host mode only: its BPF build and map modules stay out of the agent (and the zygote) when it is off.
        from planemesh.ebpf.host_redirect import HostMode

        own_mark, pin_dir = self.kernel.own_mark, self.options.pin_dir
        self.host = await self.control.call(lambda: HostMode(own_mark=own_mark, pin_dir=pin_dir))

    async def _install_routing(self) -> None:
        await self.control.call(self.kernel.install_routing)
        self.readiness.clear(ROUTES_INSTALLED)

    async def _sync_host_cgroups(self) -> None:
        added, removed = await self.control.call(sync_cgroups, self.host, self.host_cgroups)
        for path in added:
            log.info("host mode: intercepting connects in cgroup %s", path)
        for path in removed:
            log.info("host mode: released cgroup %s", path)

    async def _reload_bootstrap(self) -> None:
        boot = await asyncio.to_thread(bootstrap_for, self)  # ConfigError: the running stream stays
        if self.xds_client is not None and self.xds_client.reconfigure(boot):
            log.info("SIGHUP: bootstrap changed: reconnecting to %s as node %s", boot.server, boot.node_id)
        else:
            log.info("SIGHUP: bootstrap unchanged; the xDS stream stays")

    async def _reload_host_cgroups(self) -> tuple[str, ...]:
        """The cgroups the configuration names now (ConfigError if one is bad: nothing is applied)."""
        cgroups = await asyncio.to_thread(load_host_cgroups, self.options.host_cgroups, self.options.host_mode_file)
        if cgroups and self.host is None:
            # The workers were started without the map to look host-mode connections up in.
            raise ConfigError("host_mode", "host mode was off when the agent started: restart it to turn it on")
        return cgroups

    # ---- interfaces --------------------------------------------------------------------------
    async def _sync_interfaces(self) -> None:
        async with self._iface_lock:
            await self._sync_interfaces_locked()

    async def _sync_interfaces_locked(self) -> None:
        if self.snapshot is None:
            return
        snap = self.snapshot
        now = self._scan(snap)
        change = discovery.diff(self.interfaces, now)
        if change:
            await self.control.call(self.kernel.sync_interfaces, snap, change)
            for iface in change.added:
                log.info("plane %s: attached to %s (ifindex %d)", iface.plane, iface.ifname, iface.ifindex)
            for iface in change.removed:
                log.info("plane %s: released %s (ifindex %d)", iface.plane, iface.ifname, iface.ifindex)
        self.interfaces = now
        self.readiness.clear(PROGRAMS_ATTACHED)
        sources = discovery.plane_source_addresses(now.values(), snap.planes)
        if change and any(i.addresses for i in (*change.added, *change.changed)):
            for workers in self.workers.values():
                await workers.update(snap, sources)

    def _scan(self, snap: Snapshot) -> dict[int, PlaneInterface]:
        """The plane interfaces among the links the monitor keeps (no netlink read once it runs)."""
        return discovery.scan(snap.planes, self._watch.links() if self._watch is not None else None)

    async def reload(self) -> None:
        """SIGHUP (docs/configuration.md, "Signals"): with --config (or the embedded default) re-read the static
        file and apply it; with --bootstrap re-read the bootstrap: its host_mode section, and when its xDS
        settings changed, reconnect with them. Either way an hbone section that changed restarts the HBONE node
        with it. A bad file changes nothing. --xds-resources: the embedded server
        already follows its directory, nothing to do."""
        if self.options.bootstrap is None and self.options.xds_resources is not None:
            log.info("SIGHUP: the embedded xDS server follows %s itself; nothing to reload", self.options.xds_resources)
            return
        self.notifier.reloading()
        try:
            cgroups = await self._reload_host_cgroups()
            node_overload = await asyncio.to_thread(load_node_overload, self.options.host_mode_file)
            hbone = await asyncio.to_thread(load_hbone_section, self.options.config, self.options.bootstrap)
            if self.options.bootstrap is not None:
                await self._reload_bootstrap()
            else:
                snap = await asyncio.to_thread(load_snapshot, self.options)
                if snap is not None:
                    await self.apply(snap)
            if self.host is not None and cgroups != self.host_cgroups:
                self.host_cgroups = cgroups
                await self._sync_host_cgroups()
            await self.node_overload.reconfigure(node_overload)
            await self._reload_hbone(hbone)
        except ConfigError as exc:
            log.error("SIGHUP: keeping the running configuration: %s", exc)
        finally:
            self.notifier.ready()

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """A task owned by the agent: cancelled at shutdown; its failure stops the agent (no silent death)."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed: %r; stopping", task.get_name(), task.exception())
            self.failure = task.exception()
            self.stopping.set()

    def _on_links_changed(self) -> None:
        self._tasks = [t for t in self._tasks if not t.done()]
        self.spawn(self._resync_interfaces(), "sync-interfaces")

    async def _resync_interfaces(self) -> None:
        """After a netlink event. An interface can vanish mid-attach: log, and try again shortly."""
        for attempt in range(3):
            try:
                await self._sync_interfaces()
                return
            except Exception as exc:
                log.warning("interface sync failed (attempt %d): %s", attempt + 1, exc)
                await asyncio.sleep(0.1 * (attempt + 1))

    # ---- health and stats --------------------------------------------------------------------
    def healthy(self) -> bool:
        """Liveness: every plane has a live worker (a dead one is being restarted by its supervisor)."""
        return all(any(w.alive for w in pw.workers) for pw in self.workers.values())

    def _plane_priorities(self) -> dict[str, int]:
        snap = self.snapshot
        return {p.name: p.sla.priority for p in snap.planes if p.name in self.workers} if snap else {}

    # ---- lifecycle ---------------------------------------------------------------------------
    async def run(self, first: Snapshot | None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload(), "reload"))
        try:
            await self.control.call(self.kernel.open)
            if self.host_cgroups:
                await self._open_host_mode()
            # Queued first on the control thread (attach comes after it there), not awaited: the netlink helper's
            # start overlaps the workers' (readiness waits for it).
            self.spawn(self._install_routing(), "install-routing")
            self._takeover = await asyncio.to_thread(take_over, self.handover_path)
            self._watch = LinkMonitor(self._on_links_changed)
            self._watch.start()
            self.kernel.link_lookup = self._watch.lookup
            if first is not None:
                await self.apply(first)
            else:
                await self._start_xds()
            if self._takeover is None:
                await self._start_admin()
            self.spawn(self.worker_stats.collect(), "worker-stats")
            self.node_overload.start()
            self.spawn(run_watchdog(self.notifier, self.healthy), "watchdog")
            inherited = self._takeover.take_named(*HBONE_SOCKETS) if self._takeover is not None else {}
            if self._takeover is None or inherited:
                # With the predecessor's HBONE sockets our node serves them before it is told we are done:
                # both nodes accept on them for a moment, and no tunnelled SYN finds no listener.
                await self._start_hbone(wait_s=HBONE_READY_S, sockets=inherited)
            await self.readiness.wait()
            if self._takeover is not None:
                # Our workers serve the inherited sockets: let the predecessor drain, then take its admin socket.
                self._takeover.done()
                self._takeover = None
                await self._start_admin(retry_s=self.options.drain_timeout_s + 10)
                if self.hbone is None:  # an older predecessor sent no HBONE sockets: bound once it released them
                    await self._start_hbone(wait_s=0)
                elif self.admin_app is not None:
                    self.admin_app.stats.register("hbone", self.hbone.report)
            self._handover_server = HandoverServer(
                self.handover_path, self.listening_sockets, self._handed_over, named=self._hbone_sockets
            )
            await self._handover_server.start()
            self.notifier.ready(f"planes: {', '.join(self.workers)}")
            log.info("ready: planes %s", ", ".join(self.workers))
            print("planemesh agent ready", flush=True)
            await self.stopping.wait()
            self.notifier.stopping("draining")
        finally:
            await self.shutdown()
        if self.failure is not None:
            raise self.failure

    async def _start_hbone(self, wait_s: float, sockets: dict[str, socket.socket] | None = None) -> None:
        """Start the supervised HBONE node (if configured); wait up to `wait_s` for it to be ready (it keeps
        being retried in the background either way). `sockets`: its listening sockets from a predecessor."""
        if self.hbone_settings is None:
            return
        from planemesh.agent.hbone.supervisor import HboneSupervisor

        tag = self.options.netns or "host"
        self.hbone = HboneSupervisor(self.hbone_settings, self.options.runtime_dir, tag, self.options.pin_dir, sockets)
        self.spawn(self.hbone.run(), "hbone")
        if self.admin_app is not None:
            self.admin_app.stats.register("hbone", self.hbone.report)
        if wait_s > 0:
            try:
                async with asyncio.timeout(wait_s):
                    await self.hbone.ready.wait()
            except TimeoutError:
                log.error("HBONE node not ready after %.0fs; still trying", wait_s)

    async def _reload_hbone(self, settings: dict[str, Any] | None) -> None:
        """SIGHUP: start, restart with new settings, or stop the HBONE node as the section now says."""
        if settings == self.hbone_settings:
            return
        self.hbone_settings = settings
        if self.hbone is None:
            log.info("SIGHUP: starting the HBONE node")
            await self._start_hbone(wait_s=0)
        elif settings is None:
            log.info("SIGHUP: no hbone section any more: stopping the HBONE node")
            await self.hbone.stop(self.options.drain_timeout_s)
            if self.admin_app is not None:
                self.admin_app.stats.unregister("hbone")
            self.hbone = None
        else:
            log.info("SIGHUP: hbone section changed: restarting the HBONE node with it")
            self.hbone.reconfigure(settings)

    async def _start_xds(self) -> None:
        self.xds_client = await start_xds(self)

    async def _start_admin(self, retry_s: float = 0.0) -> None:
        # Imported once the endpoint starts, after the workers' zygote forked (run_agent): prometheus_client
        # and the http stack (~3 MB of RSS) stay out of the pages each worker shares with the agent.
        from planemesh.agent.admin import AdminBindError
        from planemesh.agent.admin_glue import start_admin

        deadline = asyncio.get_running_loop().time() + retry_s
        while True:
            try:
                self._admin = await start_admin(self)
                return
            except AdminBindError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)  # the predecessor is still releasing it

    async def shutdown(self) -> None:
        log.info("stopping: draining workers (up to %.1fs)", self.options.drain_timeout_s)
        if self.host is not None:  # first: new connects go straight to their destination, not to a draining proxy
            with contextlib.suppress(Exception):
                await self.control.call(self.host.detach)
        if self._handover_server is not None:
            await self._handover_server.close()
        # We never became ready: the predecessor keeps serving, and our HBONE node must leave its capture.
        never_ready = self._takeover is not None
        if self._takeover is not None:
            self._takeover.close()
        if self.handed_over and self._admin is not None:
            await self._admin.close()  # the successor takes the admin socket over now
            self._admin = None
        if self.hbone is not None:  # before the tasks: its supervisor must not take the stop for a crash
            await self.hbone.stop(self.options.drain_timeout_s, hand_over=self.handed_over or never_ready)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.embedded_xds_server is not None:
            await stop_xds(self)
        if self._watch is not None:
            self._watch.close()
        await asyncio.gather(
            *(w.stop(self.options.drain_timeout_s) for w in self.workers.values()), return_exceptions=True
        )
        self.workers.clear()
        if self.zygotes is not None:
            await self.zygotes.close()
        self.cpu_groups.close()
        if self._admin is not None:
            await self._admin.close()
        with contextlib.suppress(Exception):
            await self.control.call(self.kernel.close, not self.handed_over)
        if self.host is not None:
            with contextlib.suppress(Exception):
                await self.control.call(self.host.close)
        self.control.close()
        if self.handed_over:
            log.info("stopped: programs, maps and routes left to the successor")
        else:
            log.info("stopped: programs detached, routes removed")


def initial_fetch_done(snap: Snapshot) -> bool:
    """Ready to serve only with a complete first configuration: static configs always are; over xDS, a
    snapshot counts once it carries both listeners' and clusters' versions (Envoy's initial fetch), so a
    clusters-only first update never makes the agent report ready with no port declared yet.
    xDS snapshot versions read `xds:CDS=1,LDS=1,...` (planemesh.xds.client_state.XdsResources.version)."""
    if not snap.version.startswith("xds:"):
        return True
    types = {part.split("=", 1)[0] for part in snap.version[4:].split(",") if "=" in part}
    return {"LDS", "CDS"} <= types


def _listener_shape(plane: Any) -> tuple[Any, ...]:
    """What a plane's workers are started with: a change restarts them (connections they hold are reset). The
    `undeclared` setting and the inspected TCP chains are not in it: they change the kernel's rules only."""
    return (plane.proxy_port, plane.sniff_port, plane.sla.workers)


def bind_listener(port: int) -> socket.socket:
    return make_listener_socket(port, transparent=True)


def new_zygotes(prefork: bool = False) -> Zygotes:
    """The workers' fork server (agent/zygote.py), forked now (`prefork`) or exec'd at the first worker. Its modules
    are imported here: an agent that execs its workers (the default) never loads them (~70 kB of RSS)."""
    from planemesh.agent.zygote_client import Zygotes

    return Zygotes.prefork() if prefork else Zygotes()


def enter_netns(name: str) -> None:
    """Move this (still single-threaded) process into a named network namespace, network only."""
    netns.setns(name)


def load_snapshot(options: AgentOptions) -> Snapshot | None:
    if options.bootstrap is not None or options.xds_resources is not None:
        return None
    return load_static_snapshot(options.config)  # a plane requiring mTLS is refused: no Secrets without xDS


def run_agent(options: AgentOptions) -> int:
    first = load_snapshot(options)  # a bad file fails here, before anything is changed
    host_cgroups = load_host_cgroups(options.host_cgroups, options.host_mode_file)  # so does a bad cgroup
    node_overload = load_node_overload(options.host_mode_file)  # and a bad node_overload section
    hbone = load_hbone_section(options.config, options.bootstrap)  # and a bad hbone section
    if host_cgroups and options.datapath_only:
        raise ConfigError("--host-cgroup", "host mode needs planemesh's own proxy (not --datapath-only)")
    if options.netns:
        enter_netns(options.netns)
    # Forked before Agent() starts any thread: the zygote shares what the agent has imported so far.
    zygotes = new_zygotes(prefork=True) if options.worker_zygote and not options.datapath_only else None
    agent = Agent(options, host_cgroups, node_overload, hbone, zygotes)
    agent.kernel.netlink.prestart()  # pyroute2's import in the helper overlaps ours and the BPF load
    try:
        # The stdlib's loop: the agent's is a control loop (workers' channels, admin, netlink, xDS callbacks), not
        # a data path; uvloop would add ~2 MB of RSS (its loop module, libuv) to the long-lived process.
        asyncio.run(agent.run(first))
    except ConfigError:
        raise
    return 0


def _cmd_agent(args: argparse.Namespace) -> int:
    configure_logging(level=args.log_level, fmt=args.log_format)  # flag > PLANEMESH_LOG_* > default
    return run_agent(options_from_args(args))


def add_agent_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the node agent")
    for flag in ("--config", "--bootstrap", "--xds", "--xds-resources", "--handover", "--netns", "--pin-dir",
                 "--access-log", "--node-id", "--pod-name", "--host-proc"):  # fmt: skip
        p.add_argument(flag, **option("agent", flag))
    p.add_argument("--drain-timeout", type=float, **option("agent", "--drain-timeout"))
    p.add_argument("--log-level", type=str.lower, choices=LEVELS, **option("agent", "--log-level"))
    p.add_argument("--log-format", type=str.lower, choices=FORMATS, **option("agent", "--log-format"))
    p.add_argument("--datapath-only", action="store_true", **option("agent", "--datapath-only"))
    p.add_argument("--worker-zygote", action="store_true", **option("agent", "--worker-zygote"))
    p.add_argument("--no-worker-zygote", action="store_true", **option("agent", "--no-worker-zygote"))
    for flag in ("--admin", "--host-cgroup", "--node-ip"):
        p.add_argument(flag, action="append", **option("agent", flag))
    p.set_defaults(func=_cmd_agent)


__all__ = ["Agent", "add_agent_command", "run_agent"]
