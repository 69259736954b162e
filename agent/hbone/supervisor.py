"""The agent's HBONE node: a child process it starts, restarts on crash, stops, and whose counters it serves.

The agent runs one when its static configuration or bootstrap has an `hbone:` section (agent/hbone/section.py).
The child is `python -m planemesh.agent.hbone` in the agent's network namespace with the section written to
`<runtime_dir>/hbone-<tag>.yaml`, its counters in `hbone-<tag>.json` (read at scrape time), its BPF pins under
`<pin_dir>/hbone` (without --pin-dir `/sys/fs/bpf/planemesh/hbone-<tag>`), and `--shared-routing` (the
policy route is the agent's: same mark, never removed by the child).
A process rather than a task of the agent's loop: tunnel bytes are the data path, and the agent's loop
is its control plane (as the proxy workers are processes). It dies with the agent (PR_SET_PDEATHSIG).

Restart: an exit while the agent runs is logged, counted and followed by a new child after a backoff (0.5 s
doubling to 10 s; reset after 30 s of running). Hot upgrade: the predecessor tells its child to hand over
(SIGUSR1: listeners closed at once, capture left attached and fail-closed, open tunnels drained); the successor
starts its own after the hand-over once 15008 is free, and it re-uses the pinned capture program. Between the
two, new tunnelled connections are dropped (their SYN retried by the pod's kernel), never sent in plaintext
(docs/hbone.md). A restart for new settings hands over the same way; only `stop()` without `hand_over`
(the agent stops for good, the section is gone) detaches the capture.
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
    ConfigError naming the field. In a bootstrap, its `ca:` section gives certificates by CreateCertificate."""
    path = config or bootstrap
    if path is None:
        return None
    raw = read_yaml_file(path)
    if not isinstance(raw, dict) or raw.get(SECTION) is None:
        return None
    if config is None:
        boot = bootstrap_from_dict(raw)
        ca_api, planes = boot.ca, boot.planes
    else:
        ca_api, planes = None, snapshot_from_dict(raw).planes
    settings = section_settings(raw, ca_api)
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
    def __init__(self, settings: dict[str, Any], runtime_dir: Path, tag: str, pin_dir: str | None = None) -> None:
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
        self._replacing = False  # the current child is being stopped for new settings: not a crash

    def argv(self) -> list[str]:
        # -P (module_argv): started from a checkout, the child must not import the checkout's `xds/` folder
        argv = module_argv("planemesh.agent.hbone", "--config", str(self.config_path),
                           "--stats", str(self.stats_path), "--shared-routing", "--supervised")  # fmt: skip
        return [*argv, "--pin-dir", self.pin_dir]

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
            await self._port_free()
            started = loop.time()
            self.proc = await asyncio.create_subprocess_exec(*self.argv(), stdout=asyncio.subprocess.PIPE)
            self.starts += 1
            reader = asyncio.create_task(self._read_stdout(self.proc))
            try:
                self.last_exit = await self.proc.wait()
            finally:
                self.ready.clear()
                await asyncio.gather(reader, return_exceptions=True)
            if self._stopping:
                return
            if self._replacing:
                self._replacing = False
                continue
            self.restarts += 1
            backoff = BACKOFF_MIN_S if loop.time() - started >= STABLE_S else backoff
            log.error("HBONE node exited (%s); restarting in %.1fs", self.last_exit, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _port_free(self) -> None:
        """Wait until the HBONE address can be bound (a predecessor's node still holds it after a hand-over):
        cheaper than starting a child that loads its BPF program only to find the port taken."""
        host, port = check(self.settings).listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        waited = 0.0
        while not self._stopping:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, port))
                    return
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        return  # not ours to judge: the child reports it
            if waited == 0.0:
                log.info("HBONE: %s:%d is in use (a predecessor's node?); waiting for it", host, port)
            await asyncio.sleep(PORT_POLL_S)
            waited += PORT_POLL_S

    async def _read_stdout(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            if line.strip() == b"hbone ready":
                log.info("HBONE node ready (pid %d)", proc.pid)
                self.ready.set()

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """New settings (SIGHUP): the child is stopped and a new one starts with them at once (no backoff)."""
        self.settings = settings
        self._write_config()
        self.reconfigured += 1
        proc = self.proc
        if proc is not None and proc.returncode is None:
            self._replacing = True
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)  # hand over: the capture stays, fail-closed, for the new child

    async def stop(self, timeout_s: float = 5.0, hand_over: bool = False) -> None:
        """SIGTERM (the child detaches its capture, closes its listeners), SIGKILL after `timeout_s`.
        `hand_over` (a successor agent runs HBONE next): SIGUSR1, the capture stays attached and fail-closed."""
        self._stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGUSR1 if hand_over else signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if not hand_over and self.pin_dir.startswith(DEFAULT_PIN_ROOT + "/"):
            # The child removed its own pin directory; the shared root we chose goes too once nothing is in it.
            with contextlib.suppress(OSError):
                os.rmdir(DEFAULT_PIN_ROOT)

    def report(self) -> dict[str, Any]:
        """Stats provider (agent/metrics.py): per-peer rows from the child's counters, and the node's row."""
        try:
            stats = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            stats = {}
        node = {
            "up": int(self.ready.is_set()), "restarts": self.restarts, "captured": stats.get("captured", 0),
            "pid": self.proc.pid if self.proc is not None and self.proc.returncode is None else 0,
        }  # fmt: skip
        return {"hbone": peer_rows(stats), "hbone_node": [node]}
