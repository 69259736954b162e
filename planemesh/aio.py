"""Stopping asyncio tasks without losing the caller's own cancellation.

`task.cancel(); with suppress(CancelledError): await task` also swallows a cancellation of the task that waits,
which then runs on (as Python 3.11's wait_for did: a workload stream that never closed hung the test suite).
`stop_tasks` waits with asyncio.wait, which never raises for the awaited tasks' outcome and always raises for
the caller's."""

from __future__ import annotations

import asyncio


async def stop_tasks(*tasks: asyncio.Future[object] | None) -> None:
    """Cancel `tasks` (None ignored) and wait until each has ended. Their outcome is dropped, but retrieved,
    so nothing is logged for it; a cancellation of the caller while waiting propagates."""
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    if not live:
        return
    await asyncio.wait(live)
    for task in live:
        if not task.cancelled():
            task.exception()  # retrieved: an error on the way out is the stopped task's, not ours
