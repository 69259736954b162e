"""The planes' workers' stats as the agent sees them: polled every half second, the last report of each plane kept,
merged into one stats provider for the metrics registry (agent/admin_glue.py registers it as "proxy")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from planemesh.agent.worker_supervisor import PlaneWorkers

log = logging.getLogger("planemesh.agent")


class WorkerStats:
    def __init__(self, workers: Mapping[str, PlaneWorkers]) -> None:
        self._workers = workers  # the agent's live plane -> workers map (read at every poll)
        self._reports: dict[str, list[dict[str, Any]]] = {}

    def report(self) -> dict[str, Any]:
        """The workers' last reported stats, merged by the metrics registry."""
        merged: dict[str, list[Any]] = {}
        for reports in self._reports.values():
            for report in reports:
                for key, rows in report.items():
                    if isinstance(rows, list):
                        merged.setdefault(key, []).extend(rows)
        return merged

    async def collect(self, interval_s: float = 0.5) -> None:
        while True:  # all planes at once: a stuck worker's 2 s deadline does not delay the others' numbers
            planes = list(self._workers.items())
            reports = await asyncio.gather(*(w.stats() for _, w in planes), return_exceptions=True)
            for (name, _), report in zip(planes, reports, strict=True):
                if isinstance(report, BaseException):  # a worker being restarted: keep the last numbers
                    log.debug("stats from %s: %s", name, report)
                else:
                    self._reports[name] = report
            await asyncio.sleep(interval_s)
