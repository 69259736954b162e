"""The agent's node_overload loop as configured (agent/node_overload.py's NodeShedding): started with the agent,
and on SIGHUP given new marks, stopped (every plane serves everything again) or started."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from planemesh.agent.node_overload import NodeOverloadConfig, NodeShedding
from planemesh.agent.worker_supervisor import PlaneWorkers
from planemesh.aio import stop_tasks

log = logging.getLogger("planemesh.agent")

Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


class NodeOverloadLoop:
    def __init__(
        self,
        config: NodeOverloadConfig,
        workers: Mapping[str, PlaneWorkers],
        priorities: Callable[[], Mapping[str, int]],
        spawn: Spawn,
        active: bool = True,
    ) -> None:
        self.config = config
        self.shedding: NodeShedding | None = None  # the loop, while enabled
        self._task: asyncio.Task[Any] | None = None
        self._workers = workers  # the agent's live plane -> workers map
        self._priorities = priorities  # each plane's SLA priority, from the agent's snapshot
        self._spawn = spawn  # an agent-owned task: its failure stops the agent
        self._active = active  # False with --datapath-only: no worker of ours to shed in

    def start(self) -> None:
        if self.config.enabled and self._active:
            shedding = self.shedding = NodeShedding(self.config)
            self._task = self._spawn(shedding.run(self._priorities, self.set_shed), "node-overload")

    async def reconfigure(self, config: NodeOverloadConfig) -> None:
        """SIGHUP's node_overload section: new marks keep the loop (and its shed level); off stops it and every
        plane serves everything again; on starts it."""
        if config == self.config:
            return
        self.config = config
        if self.shedding is not None and config.enabled:
            self.shedding.reconfigure(config)
            log.info("SIGHUP: node_overload: new settings from the next sample")
            return
        if self._task is not None:
            await stop_tasks(self._task)
            self._task = self.shedding = None
            for plane in list(self._workers):
                await self.set_shed(plane, 0.0)
            log.info("SIGHUP: node_overload off: no plane sheds for the node")
        self.start()
        if self._task is not None:
            log.info("SIGHUP: node_overload on")

    def report(self) -> dict[str, list[dict[str, Any]]]:
        """Stats provider: each plane's node shed level (none while node_overload is off)."""
        return self.shedding.report() if self.shedding is not None else {}

    async def set_shed(self, plane: str, fraction: float) -> None:
        workers = self._workers.get(plane)
        if workers is not None:
            await workers.set_shed(fraction)
