"""labs/attacks.py against loopback servers: the flood is really sent, and a server's close is really observed."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from planemesh.labs import attacks
from planemesh.labs import h2_frames as f


@contextlib.contextmanager
def server(handle: Callable[[socket.socket, int], None]) -> Iterator[int]:
    """A loopback listener calling handle(conn, index) for each accepted connection in its own thread."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    stop = threading.Event()

    def accept() -> None:
        index = 0
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn, index), daemon=True).start()
            index += 1

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def close_after(n: int) -> Callable[[socket.socket, int], None]:
    def handle(conn: socket.socket, _: int) -> None:
        got = 0
        while got < n and (data := conn.recv(65536)):
            got += len(data)
        conn.close()  # the flood keeps coming: unread bytes make the kernel send a reset

    return handle


def test_a_flood_is_counted_and_its_close_observed() -> None:
    with server(close_after(256 * 1024)) as port:
        out = attacks.control_flood("ping_flood", "127.0.0.1", port, seconds=10.0)
    assert out.closed == 1 and out.close_how.keys() <= {"reset", "fin"}
    assert out.closed_after_s[0] < 5.0 and out.seconds < 5.0  # it stopped when the server closed, not at 10 s
    assert out.frames_sent * len(f.ping()) >= 256 * 1024  # at least what the server read was sent as whole frames


def test_a_connection_never_closed_is_reported_open() -> None:
    held: list[socket.socket] = []
    with server(lambda conn, _: held.append(conn)) as port:  # accepts, never reads, never closes
        out = attacks.control_flood("settings_flood", "127.0.0.1", port, seconds=0.5)
    assert out.closed == 0 and out.frames_sent > 1 and out.seconds >= 0.5
    for conn in held:
        conn.close()


def test_rapid_reset_reads_goaway_then_eof() -> None:
    def goaway(conn: socket.socket, _: int) -> None:
        conn.recv(4096)
        conn.sendall(
            f.settings() + f.frame(f.GOAWAY, 0, 0, (1).to_bytes(4, "big") + f.ENHANCE_YOUR_CALM.to_bytes(4, "big"))
        )
        conn.shutdown(socket.SHUT_WR)  # graceful: the client reads the GOAWAY, then EOF
        deadline = time.monotonic() + 3
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline and conn.recv(65536):
                pass
        conn.close()

    with server(goaway) as port:
        out = attacks.rapid_reset("127.0.0.1", port, seconds=10.0, connections=1)
    assert out.goaway == {"ENHANCE_YOUR_CALM": 1}
    assert out.closed == 1 and out.close_how == {"eof": 1} and out.frames_sent >= 3


def test_idle_flood_times_each_close() -> None:
    held: list[socket.socket] = []

    def half(conn: socket.socket, index: int) -> None:
        if index % 2:
            conn.close()
        else:
            held.append(conn)

    with server(half) as port:
        out = attacks.idle_flood("127.0.0.1", port, seconds=1.0, connections=40)
    assert out.connections == 40 and out.closed == 20 and out.connect_failed == 0
    assert out.close_how == {"fin": 20} and out.bytes_sent == 0
    assert out.notes["attempted"] == 40 and 0 < out.notes["opened_s"] < 1.0
    for conn in held:  # the attacker reset the ones it held: nothing of it waits in TIME_WAIT
        conn.settimeout(5)
        with pytest.raises(ConnectionResetError):
            conn.recv(1)
        conn.close()
