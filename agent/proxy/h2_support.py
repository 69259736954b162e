"""The h2 feature's one lazy-loading point: a worker loads the h2 stack (agent/proxy/h2*.py with python-hyper
h2, hpack and hyperframe, ~1.6 MB of RSS per worker: bench/footprint.py) on its first h2 connection, downstream
(an h2c preface, ALPN h2) or upstream (a cluster speaking h2), not at start-up. A plane that only ever carries
HTTP/1.1 never loads it (tests/unit/test_worker_imports.py). The first h2 connection of a worker pays the import
once (14-61 ms in three runs at load average 6)."""

from __future__ import annotations

from typing import Any

from planemesh.agent.lazy_modules import load

# No import of the modules loaded here, nor of their users, even for type checking: this module sits between
# them (attempts, server -> h2_support -> h2_*), so it names their types as Any.

_H2_DOWNSTREAM = "planemesh.agent.proxy.h2_downstream"
_H2_UPSTREAM = "planemesh.agent.proxy.h2_upstream"  # names, not f-strings: open_h2_stream runs per request


def h2_downstream(proxy: Any, preread: bytes) -> Any:
    """A client connection speaking h2 (agent/proxy/h2_downstream.py)."""
    return load(_H2_DOWNSTREAM).H2Downstream(proxy, preread)


def open_h2_stream(attempt: Any, target: tuple[str, int]) -> None:
    """agent/proxy/h2_upstream.py open_h2_stream."""
    load(_H2_UPSTREAM).open_h2_stream(attempt, target)


class LazyH2Pool:
    """PlaneProxy.h2_pool: the h2 upstream pool (h2_upstream.H2Pool), made on its first stream; until then
    there is nothing to sweep or close."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.pool: Any = None  # h2_upstream.H2Pool once made

    @property
    def conns(self) -> dict[tuple, list[Any]]:
        return self.pool.conns if self.pool is not None else {}

    def open(self, stream: Any, addr: tuple[str, int], ended: bool, connect_timeout: float,
             key: tuple | None = None) -> bytes | None:
        """h2_upstream.H2Pool.open: the breaker's refusal, or None (opened, or waiting for a stream)."""
        if self.pool is None:
            self.pool = load(_H2_UPSTREAM).H2Pool(self.proxy)
        return self.pool.open(stream, addr, ended, connect_timeout, key)

    def sweep(self, idle_timeout_s: float) -> None:
        if self.pool is not None:
            self.pool.sweep(idle_timeout_s)

    def close_all(self) -> None:
        if self.pool is not None:
            self.pool.close_all()
