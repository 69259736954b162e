"""Fixtures for the eBPF data-path tests: one loaded Datapath per module, and a worker thread
living in a private network namespace (setns is per thread; the pytest thread never moves)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


class NetnsWorker:
    """Runs callables in one thread that entered network namespace `name`."""

    def __init__(self, name: str) -> None:
        from pyroute2 import netns

        self.name = name
        netns.create(name)
        self._pool = ThreadPoolExecutor(max_workers=1, initializer=netns.setns, initargs=(name,))

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 20, **kwargs: Any) -> T:
        return self._pool.submit(fn, *args, **kwargs).result(timeout=timeout)

    def close(self) -> None:
        from pyroute2 import netns

        self._pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(OSError):
            netns.remove(self.name)


@pytest.fixture
def netns_worker(run_prefix: str) -> Iterator[NetnsWorker]:
    worker = NetnsWorker(f"{run_prefix}-bpf-{secrets.token_hex(3)}")
    try:
        yield worker
    finally:
        worker.close()


@pytest.fixture(scope="module")
def datapath() -> Iterator[Any]:
    from planemesh.ebpf.loader import Datapath

    dp = Datapath()
    try:
        yield dp
    finally:
        dp.close(detach=False)


def compile_here(spec: Any) -> Any:
    """bcc's BPF object for an ebpf.build.ProgramSpec, compiled in the test process (the agent never does
    this: ebpf/build.py compiles in a helper). For the tests that compare bcc's generated types with the
    ABI mirror."""
    from bcc import BPF

    return BPF(src_file=str(spec.source).encode(), cflags=list(spec.cflags))


@pytest.fixture
def lab(run_prefix: str) -> Iterator:
    """The default lab (node, client and server pods on planes oam and media), torn down after the test."""
    from planemesh.labs import load_lab

    with load_lab(prefix=run_prefix) as built:
        yield built
