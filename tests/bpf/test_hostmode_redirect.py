"""Host mode for real: a process in a test cgroup (cgroup v2, unified hierarchy), running in a lab's node
namespace, connects to the server pod's proxied port and lands on the plane's listener, which learns
the original destination from HostMode.original_destination; the same connect from a process outside
the cgroup reaches the server pod, and so does an in-cgroup connect to a bypassed port. Fail open: with
no listener on the plane's port, or once the programs are detached, connects go to their destination.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.ebpf.abi import Action
from planemesh.ebpf.host_redirect import (
    HostMode,
    HostModeError,
    OriginalDestinations,
    attached_programs,
    cgroup2_mounts,
)
from planemesh.ebpf.policy import DatapathPolicy, PlaneSettings, PolicyRule
from planemesh.labs.netns import call_in, exec_argv
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import Plane
from tests.netns.host_cgroups import joiner, temporary_cgroup
from tests.support.servers import AcceptLoop

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

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
    sock = make_listener_socket(port, transparent=False, backlog=16)
    sock.settimeout(0.2)
    return sock


class Greeter:
    """Accepts and answers each connection with one line made by `greet(conn)`."""

    def __init__(self, sock: socket.socket, greet) -> None:  # type: ignore[no-untyped-def]
        self.greet = greet
        self.loop = AcceptLoop(sock, self._answer, threaded=False)

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.sendall((self.greet(conn) + "\n").encode())

    def close(self) -> None:
        self.loop.close()


def _plain(host: str) -> str:
    return host.removeprefix("::ffff:")


@pytest.fixture
def cgroup(run_prefix: str) -> Iterator[str]:
    with temporary_cgroup(f"{run_prefix}-hostmode") as path:
        yield path


def _connect_from(ns: str, cgroup: str | None, address: str, port: int) -> str:
    """Run a client process in `ns` (inside `cgroup` if given: it joins before exec) and return its line."""
    proc = subprocess.run(
        exec_argv(ns, [sys.executable, "-c", CLIENT, address, str(port)]),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        preexec_fn=joiner(cgroup),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _oam(lab) -> tuple[Plane, DatapathPolicy]:  # type: ignore[no-untyped-def]
    oam = lab.spec.plane("oam")
    plane = Plane("oam", 1, ("*-oam",), (IPNetwork(str(oam.ipv4)), IPNetwork(str(oam.ipv6))), proxy_port=PROXY_PORT)
    policy = DatapathPolicy(
        planes=(PlaneSettings(1, PROXY_PORT, 15002, Action.BYPASS),), rules={PolicyRule(1, PROXIED): Action.PROXY}
    )
    return plane, policy


def _server_greeting(conn: socket.socket) -> str:
    local = conn.getsockname()
    return f"server {_plain(local[0])} {local[1]}"


def test_cgroup_connects_are_redirected_to_the_plane_listener(lab, cgroup: str) -> None:
    node, server = lab.node_ns, lab.pod_ns("server")
    server4, server6 = lab.pod_addr("server", "oam", 4), lab.pod_addr("server", "oam", 6)
    plane, policy = _oam(lab)

    host = HostMode()
    # The proxy's view: only the map fd, as a worker process has it.
    destinations = OriginalDestinations(host.peer_map_fd)
    seen: list[tuple[str, int] | None] = []

    def proxy_greeting(conn: socket.socket) -> str:
        original = destinations.proxy_original_destination(conn.getsockname(), conn.getpeername())
        seen.append(original)
        return f"proxy {_plain(original[0])} {original[1]}"

    proxy = Greeter(call_in(node, _listener, PROXY_PORT), proxy_greeting)
    real = [Greeter(call_in(server, _listener, port), _server_greeting) for port in (PROXIED, BYPASSED)]
    try:
        host.apply(policy, [plane])
        assert host.attach(cgroup) == os.path.realpath(cgroup)
        host.attach(cgroup)  # idempotent
        assert host.cgroups == (os.path.realpath(cgroup),)
        assert host.rules() == {PolicyRule(1, PROXIED): Action.PROXY}
        attached = attached_programs(cgroup)
        assert {hook: len(ids) for hook, ids in attached.items()} == {"sock_ops": 1, "connect4": 1, "connect6": 1}
        assert {i for ids in attached.values() for i in ids} == host.program_ids

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
        assert destinations.lookup("::1", 70000) is None
        # Not a loopback connection (TC-intercepted): its own address, no lookup.
        assert destinations.proxy_original_destination((server4, 80), ("198.18.1.9", 4242)) == (server4, 80)
        # A loopback connection nobody recorded keeps the listener's address (the proxy refuses it as a loop).
        assert destinations.proxy_original_destination(("::1", PROXY_PORT), ("::1", 4242)) == ("::1", PROXY_PORT)

        # Detached: the same in-cgroup connect goes straight to the server pod, and nothing of ours is left.
        host.detach()
        assert host.cgroups == ()
        assert attached_programs(cgroup) == {"sock_ops": [], "connect4": [], "connect6": []}
        assert _connect_from(node, cgroup, server4, PROXIED) == f"server {server4} {PROXIED}"
    finally:
        host.close()
        proxy.close()
        for greeter in real:
            greeter.close()


def test_no_listener_means_no_redirect(lab, cgroup: str) -> None:
    """Fail open while attached: a plane whose listener is gone (agent dead, plane restarting) is not redirected."""
    node, server = lab.node_ns, lab.pod_ns("server")
    server4, server6 = lab.pod_addr("server", "oam", 4), lab.pod_addr("server", "oam", 6)
    plane, policy = _oam(lab)
    real = Greeter(call_in(server, _listener, PROXIED), _server_greeting)
    try:
        with HostMode() as host:
            host.apply(policy, [plane])
            host.attach(cgroup)
            assert _connect_from(node, cgroup, server4, PROXIED) == f"server {server4} {PROXIED}"
            assert _connect_from(node, cgroup, server6, PROXIED) == f"server {server6} {PROXIED}"
            assert host.pending() == 0  # nothing recorded for a connect left alone
        assert attached_programs(cgroup) == {"sock_ops": [], "connect4": [], "connect6": []}
    finally:
        real.close()


def test_a_path_outside_cgroup2_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with HostMode() as host:
        missing = os.path.join(cgroup2_mounts()[0], "no-such-cgroup")
        for bad in (str(tmp_path), "/sys/fs/cgroup/memory", missing):  # not cgroup2 / a v1 hierarchy / absent
            with pytest.raises(HostModeError, match="cgroup v2"):
                host.attach(bad)
        assert host.cgroups == ()


def test_pinned_maps_are_shared_with_a_successor(lab, cgroup: str, run_prefix: str) -> None:
    """With a pin directory a second HostMode (an agent taking over) reuses the first one's maps and its
    pinned programs (compiling nothing): a connect redirected by either one is found through either one's map fd."""
    node, server = lab.node_ns, lab.pod_ns("server")
    server4 = lab.pod_addr("server", "oam", 4)
    plane, policy = _oam(lab)
    pin_dir = f"/sys/fs/bpf/{run_prefix}-host"
    proxy = Greeter(call_in(node, _listener, PROXY_PORT), lambda conn: "proxy")
    real = Greeter(call_in(server, _listener, PROXIED), _server_greeting)
    try:
        with HostMode(pin_dir=pin_dir) as first:
            first.apply(policy, [plane])
            first.attach(cgroup)
            with HostMode(pin_dir=pin_dir) as second:
                assert second.rules() == first.rules()  # the successor sees the policy before applying its own
                second.attach(cgroup)  # both attached, as during a hot upgrade
                assert _connect_from(node, cgroup, server4, PROXIED) == "proxy"
                first.detach()  # the predecessor leaves
                assert _connect_from(node, cgroup, server4, PROXIED) == "proxy"
                # Two connects recorded in the one shared map, readable through the successor's fd.
                assert second.pending() == 2
                pins = set(os.listdir(pin_dir))
                assert {p for p in pins if not p.startswith("prog_")} == {
                    "pm_host_by_cookie",
                    "pm_host_by_peer",
                    "pm_host_dest",
                    "pm_host_planes",
                    "pm_host_policy",
                }
                # ... and its programs: pinned once under their content hash, re-used by the successor.
                assert {p.rsplit("_", 1)[0] for p in pins - {p for p in pins if p.startswith("pm_")}} == {
                    "prog_pm_sockops",
                    "prog_pm_connect4",
                    "prog_pm_connect6",
                }
                assert (first.compiled, second.compiled) == (True, False)
    finally:
        proxy.close()
        real.close()
        for name in os.listdir(pin_dir) if os.path.isdir(pin_dir) else []:
            os.unlink(os.path.join(pin_dir, name))
        if os.path.isdir(pin_dir):
            os.rmdir(pin_dir)
