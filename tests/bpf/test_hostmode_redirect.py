"""Host mode for real: a process in a test cgroup (cgroup v2, unified hierarchy), running in a lab's node
namespace, connects to the server pod's proxied port and lands on the plane's listener, which learns
the original destination from HostMode.original_destination; the same connect from a process outside
the cgroup reaches the server pod, and so does an in-cgroup connect to a bypassed port.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from netaddr import IPNetwork

from planemesh.ebpf.abi import Action
from planemesh.ebpf.hostmode import HostMode, HostModeError
from planemesh.ebpf.policy import DatapathPolicy, PlaneSettings, PolicyRule
from planemesh.labs.netns import call_in, exec_argv
from planemesh.netplanes.model import Plane

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

CGROUP_ROOT = "/sys/fs/cgroup/unified"
PROXY_PORT, PROXIED, BYPASSED = 15001, 80, 9000
TIMEOUT = 10.0

CLIENT = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as s:
    s.settimeout(5)
    s.connect((sys.argv[1], int(sys.argv[2])))
    line = b""
    while not line.endswith(b"\\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        line += chunk
    print(line.decode().strip())
"""


def _listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    sock.listen(16)
    sock.settimeout(0.2)
    return sock


class Greeter:
    """Accepts and answers each connection with one line made by `greet(conn)`."""

    def __init__(self, sock: socket.socket, greet) -> None:  # type: ignore[no-untyped-def]
        self.sock, self.greet = sock, greet
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.sendall((self.greet(conn) + "\n").encode())

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(timeout=TIMEOUT)


def _plain(host: str) -> str:
    return host.removeprefix("::ffff:")


@pytest.fixture
def cgroup(run_prefix: str) -> Iterator[str]:
    path = os.path.join(CGROUP_ROOT, f"{run_prefix}-hostmode")
    os.mkdir(path)
    try:
        yield path
    finally:
        # Processes we started have exited; anything left is moved out so the directory can go.
        with contextlib.suppress(OSError), open(os.path.join(path, "cgroup.procs")) as f:
            for pid in f.read().split():
                with contextlib.suppress(OSError), open(os.path.join(CGROUP_ROOT, "cgroup.procs"), "w") as root:
                    root.write(pid)
        os.rmdir(path)


def _connect_from(ns: str, cgroup: str | None, address: str, port: int) -> str:
    """Run a client process in `ns` (inside `cgroup` if given: it joins before exec) and return its line."""

    def join() -> None:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:  # type: ignore[arg-type]
            f.write("0")  # "0": the writing process itself

    proc = subprocess.run(
        exec_argv(ns, [sys.executable, "-c", CLIENT, address, str(port)]),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        preexec_fn=join if cgroup else None,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_cgroup_connects_are_redirected_to_the_plane_listener(lab, cgroup: str) -> None:
    node, server = lab.node_ns, lab.pod_ns("server")
    server4, server6 = lab.pod_addr("server", "oam", 4), lab.pod_addr("server", "oam", 6)
    oam = lab.spec.plane("oam")
    plane = Plane("oam", 1, ("*-oam",), (IPNetwork(str(oam.ipv4)), IPNetwork(str(oam.ipv6))), proxy_port=PROXY_PORT)
    policy = DatapathPolicy(
        planes=(PlaneSettings(1, PROXY_PORT, 15002, Action.BYPASS),), rules={PolicyRule(1, PROXIED): Action.PROXY}
    )

    host = HostMode(cgroup)
    seen: list[tuple[str, int] | None] = []

    def proxy_greeting(conn: socket.socket) -> str:
        peer = conn.getpeername()
        original = host.original_destination(peer[0], peer[1])
        seen.append(original)
        return f"proxy {original[0]} {original[1]}" if original else "proxy unknown"

    def server_greeting(conn: socket.socket) -> str:
        local = conn.getsockname()
        return f"server {_plain(local[0])} {local[1]}"

    proxy = Greeter(call_in(node, _listener, PROXY_PORT), proxy_greeting)
    real = [Greeter(call_in(server, _listener, port), server_greeting) for port in (PROXIED, BYPASSED)]
    try:
        host.apply(policy, [plane])
        host.attach()
        host.attach()  # idempotent
        assert host.rules() == {PolicyRule(1, PROXIED): Action.PROXY}

        # In the cgroup: the proxied port lands on the listener with its original destination (v4,
        # v6 and v4-mapped on a v6 socket); a bypassed port is left alone.
        assert _connect_from(node, cgroup, server4, PROXIED) == f"proxy {server4} {PROXIED}"
        assert _connect_from(node, cgroup, server6, PROXIED) == f"proxy {server6} {PROXIED}"
        assert _connect_from(node, cgroup, f"::ffff:{server4}", PROXIED) == f"proxy {server4} {PROXIED}"
        assert _connect_from(node, cgroup, server4, BYPASSED) == f"server {server4} {BYPASSED}"
        # Outside the cgroup (the proxy's own side of the node): never intercepted.
        assert _connect_from(node, None, server4, PROXIED) == f"server {server4} {PROXIED}"
        assert _connect_from(node, None, server6, PROXIED) == f"server {server6} {PROXIED}"
        assert len(seen) == 3 and host.pending() == 0  # every entry was consumed by its lookup
        assert host.original_destination("127.0.0.1", 1) is None
        assert host.original_destination("not an address", 5) is None

        # Detached: the same in-cgroup connect goes straight to the server pod.
        host.detach()
        assert _connect_from(node, cgroup, server4, PROXIED) == f"server {server4} {PROXIED}"
    finally:
        host.close()
        proxy.close()
        for greeter in real:
            greeter.close()


def test_a_path_outside_cgroup2_is_refused() -> None:
    with pytest.raises(HostModeError, match="cgroup v2"):
        HostMode("/tmp")
    with pytest.raises(HostModeError, match="cgroup v2"):
        HostMode("/sys/fs/cgroup/memory")
