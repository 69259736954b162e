"""A bench's own planemesh proxy process: one PlaneProxy served on a listening socket until SIGTERM, then
drained (the benches start it with `--serve ...` and stop it with SIGTERM once the load has run)."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Any


def serve_until_sigterm(proxy: Any, sock: socket.socket, *, drain_s: float = 0.5, loop_kind: str = "uvloop") -> None:
    """Serve `proxy` (a PlaneProxy) on `sock` on a uvloop (or, `loop_kind="asyncio"`, the stdlib's) event loop;
    SIGTERM drains it for `drain_s` and returns."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(proxy.drain(drain_s)))
        await proxy.serve(sock)

    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
