"""The handover socket carries named listening sockets (the HBONE node's) next to the workers' ports, real
sockets on loopback and a real unix socket: a successor takes them by name and accepts on the very socket
the predecessor listened on (a connection queued before the hand-over is accepted after it); an agent that
knows no names takes them as extra ports (backward compatible); the HBONE child adopts only a listening TCP
socket; the supervisor re-uses an inherited socket only for the address its settings name."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from planemesh.agent.handover import HandoverServer, take_over
from planemesh.agent.hbone.listeners import CAPTURE, LISTEN, adopt, bind_listen, bound_to
from planemesh.agent.hbone.supervisor import HboneSupervisor


def listener() -> socket.socket:
    return bind_listen("127.0.0.1", 0)


def serve_once(path: Path, ports: dict[int, socket.socket], named: dict[str, socket.socket] | None) -> threading.Thread:
    """A predecessor's HandoverServer on `path` in a thread's own loop, until one successor said DONE."""
    done = threading.Event()
    up = threading.Event()

    async def main() -> None:
        server = HandoverServer(path, lambda: ports, done.set, **({"named": lambda: named} if named else {}))
        await server.start()
        up.set()
        while not done.is_set():
            await asyncio.sleep(0.02)
        await server.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert up.wait(10)
    return thread


def test_named_sockets_travel_by_name_and_keep_their_queue(tmp_path: Path) -> None:
    worker, hbone = listener(), listener()
    path = tmp_path / "handover.sock"
    thread = serve_once(path, {worker.getsockname()[1]: worker}, {LISTEN: hbone})
    queued = socket.create_connection(hbone.getsockname(), timeout=5)  # waits in the accept queue
    takeover = take_over(path)
    assert takeover is not None
    assert set(takeover.sockets) == {worker.getsockname()[1]}  # the worker port, not the named one
    got = takeover.take_named(LISTEN, CAPTURE)
    assert set(got) == {LISTEN}
    hbone.close()  # the predecessor lets go: the successor's copy is the same socket
    got[LISTEN].settimeout(5)
    conn, _ = got[LISTEN].accept()
    queued.sendall(b"x")
    assert conn.recv(1) == b"x"
    takeover.done()
    thread.join(10)
    for s in (conn, queued, got[LISTEN], worker):
        s.close()


def test_an_agent_without_names_takes_them_as_ports(tmp_path: Path) -> None:
    """An older successor reads only `ports` (one per fd, as its take_over checks): the named socket is one
    more port, which it closes as unused."""
    worker, hbone = listener(), listener()
    path = tmp_path / "handover.sock"
    thread = serve_once(path, {worker.getsockname()[1]: worker}, {LISTEN: hbone})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(b"TAKEOVER\n")
        data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 16)
        ports = json.loads(data)["ports"]
        assert ports == [worker.getsockname()[1], hbone.getsockname()[1]] and len(fds) == len(ports)
        for fd in fds:
            os.close(fd)
        conn.sendall(b"DONE\n")
        thread.join(10)
    worker.close()
    hbone.close()


def test_adopt_refuses_what_is_not_a_listening_tcp_socket() -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    idle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    for s in (udp, idle):
        with pytest.raises(ValueError, match="not a listening TCP socket"):
            adopt(s.fileno())
        s.close()
    sock = listener()
    assert adopt(sock.fileno()).getsockname() == sock.getsockname()


def test_supervisor_keeps_an_inherited_socket_only_for_its_address(tmp_path: Path) -> None:
    mine, other = listener(), listener()
    port = mine.getsockname()[1]
    assert bound_to(mine, "127.0.0.1", port) and not bound_to(mine, "::", port)
    settings = {"node": {"identity": "spiffe://td/ns/a/sa/n"}, "ca": str(tmp_path), "listen": f"127.0.0.1:{port}",
                "workloads": {}, "peers": []}  # fmt: skip
    sup = HboneSupervisor(settings, tmp_path, "t", sockets={LISTEN: mine, CAPTURE: other})
    asyncio.run(sup._bind())
    assert sup.sockets == {LISTEN: mine}  # no capture in the settings: its socket closed
    assert other.fileno() == -1
    assert sup.argv()[-2:] == ["--listen-fd", str(mine.fileno())]
    mine.close()
