"""sd_notify against a real unix datagram socket, the watchdog loop, and readiness blockers."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from planemesh.agent.sdnotify import (
    DEFAULT_BLOCKERS,
    LISTENERS_BOUND,
    Notifier,
    Readiness,
    run_watchdog,
    watchdog_interval_s,
)


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(2.0)
    try:
        yield path, sock
    finally:
        sock.close()


def _drain(sock: socket.socket, timeout_s: float = 0.05) -> list[str]:
    messages = []
    sock.settimeout(timeout_s)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except TimeoutError:
        return messages


def test_ready_status_stopping_reach_the_socket(notify_socket):
    path, sock = notify_socket
    notifier = Notifier(env={"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready(status="serving 2 planes")
    lines = sock.recv(4096).decode().splitlines()
    assert lines[0] == "READY=1"
    assert "STATUS=serving 2 planes" in lines
    assert f"MAINPID={os.getpid()}" in lines
    assert notifier.status("draining\n3 connections")
    assert sock.recv(4096) == b"STATUS=draining 3 connections"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_abstract_socket_name():
    name = f"planemesh-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        assert Notifier(env={"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert sock.recv(64) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_noop():
    notifier = Notifier(env={})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_send_failure_is_reported_not_raised(tmp_path):
    notifier = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_a_receiver_that_never_reads_cannot_block_us(notify_socket):
    path, _sock = notify_socket  # bound, never read: its queue fills up
    notifier = Notifier(env={"NOTIFY_SOCKET": path})
    started = time.monotonic()
    sent = [notifier.watchdog() for _ in range(2000)]
    assert time.monotonic() - started < 2.0
    assert sent[0] is True and sent[-1] is False  # dropped once the queue is full, never blocked


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({}, 1, None),
        ({"WATCHDOG_USEC": "20000000"}, 1, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, 1, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "2"}, 1, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, 1, None),
        ({"WATCHDOG_USEC": "soon"}, 1, None),  # malformed: ignored, not a crash
    ],
)
def test_watchdog_interval(env, pid, expected):
    assert watchdog_interval_s(env, pid=pid) == expected


def test_watchdog_pings_keep_coming_only_while_healthy(notify_socket):
    path, sock = notify_socket
    notifier = Notifier(env={"NOTIFY_SOCKET": path})
    healthy = [True]

    async def scenario() -> tuple[list[str], list[str]]:
        task = asyncio.create_task(run_watchdog(notifier, lambda: healthy[0], interval_s=0.02))
        try:
            await asyncio.sleep(0.25)
            while_healthy = _drain(sock, 0.01)
            healthy[0] = False
            await asyncio.sleep(0.05)  # let a ping already in flight land
            _drain(sock, 0.01)
            await asyncio.sleep(0.2)
            while_unhealthy = _drain(sock, 0.01)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return while_healthy, while_unhealthy

    while_healthy, while_unhealthy = asyncio.run(asyncio.wait_for(scenario(), 5))
    assert len(while_healthy) >= 5 and set(while_healthy) == {"WATCHDOG=1"}
    assert while_unhealthy == []


def test_watchdog_treats_a_raising_check_as_unhealthy(notify_socket):
    path, sock = notify_socket

    def broken() -> bool:
        raise RuntimeError("boom")

    async def scenario() -> None:
        task = asyncio.create_task(run_watchdog(Notifier(env={"NOTIFY_SOCKET": path}), broken, interval_s=0.02))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(scenario(), 5))
    assert _drain(sock) == []


def test_watchdog_returns_at_once_without_systemd():
    asyncio.run(asyncio.wait_for(run_watchdog(Notifier(env={}), lambda: True, interval_s=0.01), 2))


def test_readiness_flips_when_all_blockers_clear():
    readiness = Readiness()
    fired: list[str] = []
    readiness.on_ready(lambda: fired.append("ready"))
    assert not readiness.ready and set(readiness.blockers) == set(DEFAULT_BLOCKERS)
    for blocker in DEFAULT_BLOCKERS[:-1]:
        readiness.clear(blocker)
        assert not readiness.ready
    readiness.clear("never registered")  # idempotent, harmless
    readiness.clear(DEFAULT_BLOCKERS[-1])
    assert readiness.ready and readiness.blockers == ()
    assert fired == ["ready"]
    readiness.block(LISTENERS_BOUND)  # a component lost its footing
    assert readiness.blockers == (LISTENERS_BOUND,)
    readiness.clear(LISTENERS_BOUND)
    assert fired == ["ready"]  # READY=1 is sent once
    late: list[int] = []
    readiness.on_ready(lambda: late.append(1))
    assert late == [1]


def test_readiness_wait():
    readiness = Readiness(["one"])

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, readiness.clear, "one")
        await asyncio.wait_for(readiness.wait(poll_s=0.01), 2)

    asyncio.run(scenario())
    assert readiness.ready
