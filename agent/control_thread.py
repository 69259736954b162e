"""One thread for every kernel-control call (netlink, BPF maps, TC attach).

pyroute2's synchronous API cannot run inside a thread that runs an asyncio loop, and kernel changes
are easier to reason about when they happen one at a time, in order. The thread is created from the
agent's main thread after it entered the node's network namespace, so it lives there too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ControlThread:
    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="planemesh-control")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def call_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
