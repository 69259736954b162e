"""The agent's node_overload loop (agent/node_overload_loop.py) across SIGHUPs: started only when enabled (and
never with --datapath-only), new marks keep it running, off stops it and every plane serves everything again."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from planemesh.agent.node_overload import NodeOverloadConfig, node_overload_from_dict
from planemesh.agent.node_overload_loop import NodeOverloadLoop
from tests.unit.test_node_pressure import PSI, _proc


class _Workers:  # a plane's PlaneWorkers as the loop sees it
    def __init__(self) -> None:
        self.shed: list[float] = []

    async def set_shed(self, fraction: float) -> None:
        self.shed.append(fraction)


async def _scenario(root: Path, active: bool) -> tuple[dict[str, _Workers], list[str], list[Any]]:
    workers = {"oam": _Workers(), "media": _Workers()}
    tasks: list[asyncio.Task[Any]] = []

    def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        tasks.append(asyncio.create_task(coro, name=name))
        return tasks[-1]

    on = node_overload_from_dict({"enabled": True, "proc_root": str(root), "interval_s": 30})  # one sample here
    loop = NodeOverloadLoop(on, workers, lambda: {"oam": 1, "media": 2}, spawn, active=active)  # type: ignore[arg-type]
    loop.start()
    await asyncio.sleep(0.1)
    seen = [loop.report()]
    await loop.reconfigure(on)  # unchanged: nothing happens
    await loop.reconfigure(node_overload_from_dict({"enabled": True, "proc_root": str(root), "interval_s": 20}))
    seen.append(loop.shedding is not None and loop.shedding.config.interval_s)
    await loop.reconfigure(NodeOverloadConfig())  # off
    seen.append(loop.report())
    names = [t.get_name() for t in tasks]
    for t in tasks:
        t.cancel()
    return workers, names, seen


def test_the_loop_sheds_keeps_running_on_new_marks_and_clears_when_turned_off(tmp_path: Path) -> None:
    workers, tasks, seen = asyncio.run(_scenario(_proc(tmp_path, PSI), active=True))
    assert tasks == ["node-overload"]  # one loop: new marks did not start a second one
    assert seen[0] == {"node_shed": [{"plane": "media", "fraction": 0.25}, {"plane": "oam", "fraction": 0.0}]}
    assert seen[1] == 20  # the running loop took the new interval
    assert seen[2] == {}  # off: no level reported
    assert workers["media"].shed[0] == 0.25 and workers["media"].shed[-1] == 0.0  # off: everything served again
    assert workers["oam"].shed[-1] == 0.0


def test_datapath_only_never_starts_the_loop(tmp_path: Path) -> None:
    workers, tasks, seen = asyncio.run(_scenario(_proc(tmp_path, PSI), active=False))
    assert tasks == [] and seen[0] == {} and workers["media"].shed == []
