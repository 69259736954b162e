"""Cancellation is never swallowed: a task cancelled in the very loop turn its awaited read completes ends
cancelled, and stopping child tasks (planemesh/aio.py) keeps the caller's own cancellation.

Python 3.11's `asyncio.wait_for` returns the result instead, swallowing the cancellation: the pod watch's task
then ran on, the workload streams never closed and the suite hung (CI, test_workload_tokens). The product waits
with `asyncio.timeout` (ruff bans wait_for, pyproject.toml); these tests cancel at each turn around the moment the
data arrives, so a waiter that swallows would be caught in any of them."""

from __future__ import annotations

import asyncio
import gc

import pytest

from planemesh.agent.workloads import kube_http
from planemesh.aio import stop_tasks


async def _cancelled_around_arrival(read, feed, turns: int) -> bool:
    """Whether the read, cancelled `turns` loop turns after its data arrived, honoured the cancellation (a read
    that had already returned before cancel() counts as honouring it)."""
    reader = asyncio.StreamReader()
    task = asyncio.create_task(read(reader))
    for _ in range(3):
        await asyncio.sleep(0)  # the read is waiting for data
    feed(reader)
    for _ in range(turns):
        await asyncio.sleep(0)
    if task.done():
        return True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return task.cancelled()


@pytest.mark.parametrize("turns", range(4))
def test_a_watch_line_read_ends_cancelled(turns: int) -> None:
    async def line(reader: asyncio.StreamReader) -> bytes:
        return await kube_http._read_line(reader, 1024, idle_s=5.0)

    assert asyncio.run(_cancelled_around_arrival(line, lambda r: r.feed_data(b"line\n"), turns))


@pytest.mark.parametrize("turns", range(4))
def test_a_watch_chunk_read_ends_cancelled(turns: int) -> None:
    async def first_chunk(reader: asyncio.StreamReader) -> bytes:
        return await anext(kube_http._chunks(reader, idle_s=5.0))

    def feed(reader: asyncio.StreamReader) -> None:
        reader.feed_data(b"5\r\n")
        reader.feed_data(b"hello\r\n")

    assert asyncio.run(_cancelled_around_arrival(first_chunk, feed, turns))


def test_stop_tasks_ends_them_and_keeps_the_callers_cancellation() -> None:
    """stop_tasks: every task ended, a failing one's error retrieved (not logged), None ignored; and the caller,
    cancelled while it waits for a task slow to stop, ends cancelled (suppress(CancelledError) swallowed it)."""

    async def fails() -> None:
        raise RuntimeError("on the way out")

    async def slow_to_stop(stopping: asyncio.Event) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            stopping.set()
            await asyncio.sleep(0.2)  # its own clean-up, shielded from nothing: the caller is cancelled meanwhile

    async def scenario() -> tuple[bool, bool, bool]:
        failing, sleeping = asyncio.create_task(fails()), asyncio.create_task(asyncio.sleep(3600))
        await asyncio.sleep(0)
        await stop_tasks(failing, None, sleeping)
        stopping = asyncio.Event()
        slow = asyncio.create_task(slow_to_stop(stopping))
        await asyncio.sleep(0)
        caller = asyncio.create_task(stop_tasks(slow))
        await stopping.wait()
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
        await asyncio.gather(slow, return_exceptions=True)
        return failing.done() and sleeping.cancelled(), caller.cancelled(), slow.cancelled()

    handler_calls: list[dict] = []

    async def main() -> tuple[bool, bool, bool]:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: handler_calls.append(ctx))
        return await scenario()

    assert asyncio.run(main()) == (True, True, True)
    gc.collect()  # an unretrieved task exception is reported when the task is collected
    assert handler_calls == []
