"""The agent's HBONE node: a child process it starts, restarts on crash, stops, and whose counters it serves.

The agent runs one when its static configuration or bootstrap has an `hbone:` section (agent/hbone/section.py).
The child is `python -m planemesh.agent.hbone` in the agent's network namespace with the section written to
`<runtime_dir>/hbone-<tag>.yaml`, its counters in `hbone-<tag>.json` (read at scrape time), its BPF pins under
`<pin_dir>/hbone` (without --pin-dir `/sys/fs/bpf/planemesh/hbone-<tag>`), and `--shared-routing` (the
policy route is the agent's: same mark, never removed by the child).
A process rather than a task of the agent's loop: tunnel bytes are the data path, and the agent's loop
is its control plane (as the proxy workers are processes). It dies with the agent (PR_SET_PDEATHSIG).

The listening sockets (15008 and the capture port, agent/hbone/listeners.py) are the agent's: it binds them
once and every child it starts inherits them (--listen-fd, --capture-fd), so the kernel keeps a listener on
both ports while a child restarts or is replaced, and a SYN the capture assigns waits in the accept queue
instead of being dropped by the fail-closed plane.

Restart: an exit while the agent runs is logged, counted and followed by a new child after a backoff (0.5 s
doubling to 10 s; reset after 30 s of running). New settings: the running child hands over (SIGUSR1: stops
accepting, capture left attached, open tunnels drained) and a new one starts at once on the same sockets.
Hot upgrade: the sockets go to the successor agent over the handover socket (`sockets`, named in its
manifest); the successor starts its node on them before it tells the predecessor it is done, so both nodes
accept on the same sockets for a moment and no SYN finds no listener; the predecessor's node then hands over.
From a predecessor that sent none (an older agent), the successor binds them once its predecessor's node
released them (the old gap: new tunnelled connections dropped, their SYN retried, never sent in plaintext).
Only `stop()` without `hand_over` (the agent stops for good, the section is gone) detaches the capture.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from planemesh import module_argv
from planemesh.agent.hbone.listeners import CAPTURE, LISTEN, bind_capture, bind_listen, bound_to
from planemesh.agent.hbone.section import SECTION, check, section_settings
from planemesh.agent.hbone.stats import peer_rows
from planemesh.agent.identity.ca import CertError
from planemesh.agent.identity.ca_files import read_ca
from planemesh.model.config import ConfigError
from planemesh.model.planes import Plane
from planemesh.model.static_config import read_yaml_file, snapshot_from_dict
from planemesh.xds.bootstrap import bootstrap_from_dict

log = logging.getLogger("planemesh.hbone")
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 10.0
PORT_POLL_S = 0.2
DEFAULT_PIN_ROOT = "/sys/fs/bpf/planemesh"  # the agent runs without --pin-dir: HBONE's pins go here
STABLE_S = 30.0  # a child that ran this long restarts after the minimum backoff again


def load_hbone(config: Path | None, bootstrap: Path | None) -> dict[str, Any] | None:
    """The checked `hbone:` settings of the agent's static config or bootstrap (None: no section).
    ConfigError naming the field. In a bootstrap, its `ca:` section gives certificates by CreateCertificate, and
    its `server.tls`/`server.token_file` are the WDS stream's unless `hbone.wds` sets its own."""
    path = config or bootstrap
    if path is None:
        return None
    raw = read_yaml_file(path)
    if not isinstance(raw, dict) or raw.get(SECTION) is None:
        return None
    if config is None:  # the bootstrap's CA and xDS channel settings are the section's defaults
        boot = bootstrap_from_dict(raw)
        ca_api, planes, server_tls, token_file = boot.ca, boot.planes, boot.tls, boot.token_file
    else:
        ca_api, planes, server_tls, token_file = None, snapshot_from_dict(raw).planes, None, None
    settings = section_settings(raw, ca_api, server_tls, token_file)
    check_ports(settings, planes)  # the capture against the agent's planes
    if settings is not None and "ca" in settings:
        try:
            read_ca(Path(settings["ca"]))  # a missing or expired CA fails the agent's start, not its child's
        except (ConfigError, CertError) as exc:
            raise ConfigError("hbone.ca", getattr(exc, "reason", str(exc))) from None
    return settings


def check_ports(settings: dict[str, Any] | None, planes: Sequence[Plane]) -> None:
    """The capture cannot share a port with a plane's proxy workers (both bind it on `::`), nor an interface
    with a plane (one TC program of ours per interface: the agent's and HBONE's would replace each other)."""
    capture = check(settings).capture if settings else None
    if capture is None:
        return
    for plane in planes:
        for name in ("proxy_port", "sniff_port"):
            if capture.port == getattr(plane, name):
                raise ConfigError("hbone.capture.port", f"{capture.port} is plane {plane.name}'s {name}")
        for i, ifname in enumerate(capture.interfaces):
            if plane.claims_interface(ifname):
                raise ConfigError(f"hbone.capture.interfaces[{i}]", f"{ifname!r} is an interface of plane {plane.name}")


class HboneSupervisor:
    def __init__(
        self, settings: dict[str, Any], runtime_dir: Path, tag: str, pin_dir: str | None = None,
        sockets: dict[str, socket.socket] | None = None,
    ) -> None:  # fmt: skip
        """`sockets`: listening sockets taken over from a predecessor agent (LISTEN, CAPTURE); re-used when the
        settings name the same addresses."""
        self.settings = settings
        self.config_path = runtime_dir / f"hbone-{tag}.yaml"
        self.stats_path = runtime_dir / f"hbone-{tag}.json"
        # Always pinned (the agent's own pins or not): a restart or successor re-uses the program (no compile).
        self.pin_dir = f"{pin_dir.rstrip('/')}/hbone" if pin_dir else f"{DEFAULT_PIN_ROOT}/hbone-{tag}"
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()  # set while a child that said "hbone ready" runs
        self.starts = 0
        self.restarts = 0
        self.last_exit: int | None = None
        self.reconfigured = 0
        self._stopping = False
        self.sockets: dict[str, socket.socket] = dict(sockets or {})  # every child serves these
        self._replace = asyncio.Event()
        # children replaced by new settings, draining their open tunnels
        self._retiring: dict[asyncio.subprocess.Process, asyncio.Task] = {}

    def argv(self) -> list[str]:
        # -P (module_argv): started from a checkout, the child must not import the checkout's `xds/` folder
        argv = module_argv("planemesh.agent.hbone", "--config", str(self.config_path),
                           "--stats", str(self.stats_path), "--shared-routing", "--supervised")  # fmt: skip
        fds = [(f"--{name.split('.')[1]}-fd", str(sock.fileno())) for name, sock in self.sockets.items()]
        return [*argv, "--pin-dir", self.pin_dir, *(x for pair in fds for x in pair)]

    def _write_config(self) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(self.settings, f)

    async def run(self) -> None:
        """Forever (a task of the agent): start the child, wait for it, restart it after a backoff."""
        self._write_config()
        self.stats_path.unlink(missing_ok=True)  # counters start at zero with the agent
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_MIN_S
        while not self._stopping:
            await self._bind()
            if self._stopping:
                return
            started = loop.time()
            self._replace.clear()  # settings changed before this start are the ones it reads
            fds = [sock.fileno() for sock in self.sockets.values()]
            proc = await asyncio.create_subprocess_exec(*self.argv(), stdout=asyncio.subprocess.PIPE, pass_fds=fds)
            self.proc = proc
            self.starts += 1
            reader = asyncio.create_task(self._read_stdout(proc))
            if await self._replaced_first(proc):
                self._retire(proc, reader)  # it drains; the next child starts now, on the same sockets
                continue
            try:
                self.last_exit = await proc.wait()
            finally:
                self.ready.clear()
                await asyncio.gather(reader, return_exceptions=True)
            if self._stopping:
                return
            self.restarts += 1
            backoff = BACKOFF_MIN_S if loop.time() - started >= STABLE_S else backoff
            log.error("HBONE node exited (%s); restarting in %.1fs", self.last_exit, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _replaced_first(self, proc: asyncio.subprocess.Process) -> bool:
        """Wait for the child's exit or new settings (reconfigure); True for the latter."""
        exited = asyncio.ensure_future(proc.wait())
        replaced = asyncio.ensure_future(self._replace.wait())
        await asyncio.wait({exited, replaced}, return_when=asyncio.FIRST_COMPLETED)
        replaced.cancel()
        exited.cancel()
        if not self._replace.is_set() or self._stopping:
            return False
        self._replace.clear()
        if proc.returncode is not None:
            return False
        self.ready.clear()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGUSR1)  # hand over: stop accepting, drain; the capture stays
        return True

    def _retire(self, proc: asyncio.subprocess.Process, reader: asyncio.Task) -> None:
        async def wait() -> None:
            await proc.wait()
            await asyncio.gather(reader, return_exceptions=True)

        task = asyncio.get_running_loop().create_task(wait())
        self._retiring[proc] = task
        task.add_done_callback(lambda _t: self._retiring.pop(proc, None))

    def _wanted(self) -> dict[str, tuple[str, int]]:
        settings = check(self.settings)
        want = {LISTEN: settings.listen}
        if settings.capture is not None:
            want[CAPTURE] = ("::", settings.capture.port)
        return want

    async def _bind(self) -> None:
        """The listening sockets the next child serves: kept while the settings name their address, else
        bound here, waiting while another process (a predecessor's node) still holds the port. Any other bind
        error is not ours to judge: the child, without that socket, binds itself and reports it."""
        want = self._wanted()
        for name in list(self.sockets):
            if name not in want or not bound_to(self.sockets[name], *want[name]):
                self.sockets.pop(name).close()
        for name, (host, port) in want.items():
            waited = False
            while name not in self.sockets and not self._stopping:
                try:
                    self.sockets[name] = bind_listen(host, port) if name == LISTEN else bind_capture(port)
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        log.error("HBONE: cannot bind %s:%d: %s", host, port, exc)
                        break
                    if not waited:
                        log.info("HBONE: %s:%d is in use (a predecessor's node?); waiting for it", host, port)
                        waited = True
                    await asyncio.sleep(PORT_POLL_S)

    async def _read_stdout(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            if line.strip() == b"hbone ready":
                log.info("HBONE node ready (pid %d)", proc.pid)
                self.ready.set()

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """New settings (SIGHUP): the child hands over (drains its open tunnels) and a new one starts with them
        at once, on the same listening sockets when the addresses did not change."""
        self.settings = settings
        self._write_config()
        self.reconfigured += 1
        self._replace.set()

    async def stop(self, timeout_s: float = 5.0, hand_over: bool = False) -> None:
        """SIGTERM (the child detaches its capture, closes its listeners), SIGKILL after `timeout_s`.
        `hand_over` (a successor agent runs HBONE next): SIGUSR1, the capture stays attached and fail-closed."""
        self._stopping = True
        self._replace.set()  # wakes run() from its wait
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1 if hand_over else signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout_s):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await self._stop_retiring(timeout_s)
        for sock in self.sockets.values():  # a successor agent holds its own copies (the handover socket)
            sock.close()
        self.sockets.clear()
        if not hand_over and self.pin_dir.startswith(DEFAULT_PIN_ROOT + "/"):
            # The child removed its own pin directory; the shared root we chose goes too once nothing is in it.
            with contextlib.suppress(OSError):
                os.rmdir(DEFAULT_PIN_ROOT)

    async def _stop_retiring(self, timeout_s: float) -> None:
        """Children replaced by new settings that still drain: the same drain timeout, then SIGKILL."""
        if not self._retiring:
            return
        _done, pending = await asyncio.wait(set(self._retiring.values()), timeout=timeout_s)
        for proc, task in list(self._retiring.items()):
            if task in pending:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await asyncio.gather(*self._retiring.values(), return_exceptions=True)

    def report(self) -> dict[str, Any]:
        """Stats provider (agent/metrics.py): per-peer rows from the child's counters, and the node's row."""
        try:
            stats = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            stats = {}
        node = {
            "up": int(self.ready.is_set()), "restarts": self.restarts, "captured": stats.get("captured", 0),
            "wds_acks": stats.get("wds_acks", 0), "wds_nacks": stats.get("wds_nacks", 0),
            "pid": self.proc.pid if self.proc is not None and self.proc.returncode is None else 0,
        }  # fmt: skip
        return {"hbone": peer_rows(stats), "hbone_node": [node]}
