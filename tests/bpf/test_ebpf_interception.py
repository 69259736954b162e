"""Real interception in network namespaces (planemesh.labs' default lab: client and server pods,
each with an oam and a media interface, routed through the node namespace).

The classifier is attached on the node side of the client's oam veth, policy routing is installed
in the node namespace, and a transparent dual-stack listener plays the proxy there. A connection
from the client pod to port 80 of the *server pod's* address lands on that listener with the
original destination as its local address; port 9000 is bypassed and reaches the real server pod
with the client's own source address. Closing leaves no qdisc, filter, rule, route or pin behind,
and a restarted loader re-adopts pinned maps while the attached filter keeps intercepting.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from pyroute2 import IPRoute

from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.ebpf import abi, tc_attach
from planemesh.ebpf.abi import Action, Reason
from planemesh.ebpf.loader import Datapath
from planemesh.ebpf.policy import PolicyRule
from planemesh.labs.netns import call_in
from planemesh.netplanes import routing
from tests.support.servers import AcceptLoop

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

PLANE = 1
PROXY_PORT, SNIFF_PORT, PROXIED, BYPASSED = 15001, 15002, 80, 9000
PAYLOAD = os.urandom(1 << 20)  # 1 MiB each way per connection
CHUNK = 64 * 1024
TIMEOUT = 10.0


def _dual_stack_listener(port: int, transparent: bool) -> socket.socket:
    # transparent: accept connections to addresses that are not local (TPROXY semantics)
    sock = make_listener_socket(port, transparent=transparent, backlog=64)
    sock.settimeout(TIMEOUT)
    return sock


def _unmapped(host: str) -> str:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    return str(ip.ipv4_mapped) if ip.version == 6 and ip.ipv4_mapped else str(ip)


class EchoServer:
    """Accepts on a listening socket; each connection gets one line 'local_ip local_port peer_ip'
    and then an echo of everything it sends. Runs in a thread; the socket fixes the netns."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.loop = AcceptLoop(listener, self._echo)

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            local, peer = conn.getsockname(), conn.getpeername()
            conn.sendall(f"{_unmapped(local[0])} {local[1]} {_unmapped(peer[0])}\n".encode())
            with contextlib.suppress(OSError):
                while data := conn.recv(CHUNK):
                    conn.sendall(data)

    def close(self) -> None:
        self.loop.close()


@dataclass
class Reply:
    local: str
    port: int
    peer: str


def _exchange(sock: socket.socket, dst: tuple[str, int]) -> Reply:
    """Connect, read the server's line, then push PAYLOAD through the echo and check every byte."""
    with sock:
        sock.settimeout(TIMEOUT)
        sock.connect(dst)
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1)
            assert chunk, "connection closed before the greeting"
            line += chunk
        local, port, peer = line.decode().split()
        for start in range(0, len(PAYLOAD), CHUNK):
            block = PAYLOAD[start : start + CHUNK]
            sock.sendall(block)
            got = b""
            while len(got) < len(block):
                data = sock.recv(len(block) - len(got))
                assert data, "echo stream ended early"
                got += data
            assert got == block
        return Reply(local, int(port), peer)


@pytest.fixture
def pin_dir(run_prefix: str) -> Iterator[str]:
    path = f"/sys/fs/bpf/{run_prefix}-intercept"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _in(ns: str, fn: Callable, *args):  # type: ignore[no-untyped-def]
    return call_in(ns, fn, *args)


def _ifindex(name: str) -> int:
    with IPRoute() as ipr:
        return ipr.link_lookup(ifname=name)[0]


def _socket(ns: str, family: int) -> socket.socket:
    return call_in(ns, socket.socket, family, socket.SOCK_STREAM)


def _kernel_leftovers(ifindex: int) -> dict:
    with IPRoute() as ipr:
        qdiscs = [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=ifindex)]
        filters = tc_attach.filter_attached(ipr, ifindex) if "clsact" in qdiscs else False
        rules = [
            r.get_attr("FRA_PRIORITY")
            for fam in routing.FAMILIES
            for r in ipr.get_rules(family=fam)
            if r.get_attr("FRA_PRIORITY") == routing.DEFAULT_PRIORITY
        ]
        table = [r for fam in routing.FAMILIES for r in ipr.get_routes(family=fam, table=routing.DEFAULT_TABLE)]
    return {"clsact": "clsact" in qdiscs, "filter": filters, "rules": rules, "routes": len(table)}


def test_proxied_port_lands_on_the_transparent_listener(lab, pin_dir: str) -> None:
    node, client, server = lab.node_ns, lab.pod_ns("client"), lab.pod_ns("server")
    client4, client6 = lab.pod_addr("client", "oam", 4), lab.pod_addr("client", "oam", 6)
    server4, server6 = lab.pod_addr("server", "oam", 4), lab.pod_addr("server", "oam", 6)
    ifindex = _in(node, _ifindex, lab.node_ifname("client", "oam"))

    proxy = EchoServer(_in(node, _dual_stack_listener, PROXY_PORT, True))
    real = EchoServer(_in(server, _dual_stack_listener, BYPASSED, False))
    dp = Datapath(pin_dir=pin_dir)
    try:
        _in(node, dp.attach, ifindex)
        _in(node, dp.attach, ifindex)  # idempotent
        dp.set_interface(ifindex, PLANE)
        dp.set_plane(PLANE, PROXY_PORT, SNIFF_PORT, Action.BYPASS)
        dp.sync_policy({PolicyRule(PLANE, PROXIED): Action.PROXY, PolicyRule(PLANE, BYPASSED): Action.BYPASS})
        assert _in(node, routing.install) and _in(node, routing.install) == []

        # Proxied: lands on the node's listener, which sees the original destination as its address.
        assert _exchange(_socket(client, socket.AF_INET), (server4, PROXIED)) == Reply(server4, PROXIED, client4)
        assert _exchange(_socket(client, socket.AF_INET6), (server6, PROXIED)) == Reply(server6, PROXIED, client6)
        # Bypassed: the real server pod answers and sees the client's own address.
        assert _exchange(_socket(client, socket.AF_INET), (server4, BYPASSED)) == Reply(server4, BYPASSED, client4)
        assert _exchange(_socket(client, socket.AF_INET6), (server6, BYPASSED)) == Reply(server6, BYPASSED, client6)

        counters = dp.counters()
        assert counters[(PLANE, Reason.LISTENER)][0] == 2  # one SYN per proxied connection
        assert counters[(PLANE, Reason.ESTABLISHED)][0] > 2 * len(PAYLOAD) // 65536  # data rode the accepted socket
        assert counters[(PLANE, Action.BYPASS)][0] > 0
        assert (PLANE, Reason.NO_LISTENER) not in counters

        # Agent restart: the old loader goes without detaching; the filter keeps intercepting with
        # the pinned maps, and a new loader re-adopts them.
        dp.close(detach=False)
        assert _exchange(_socket(client, socket.AF_INET), (server4, PROXIED)).local == server4
        dp = Datapath(pin_dir=pin_dir)
        assert dp.interfaces()[ifindex][0] == PLANE
        assert dp.policy()[PolicyRule(PLANE, PROXIED)] is Action.PROXY
        assert dp.counters()[(PLANE, Reason.LISTENER)][0] == 3
        _in(node, dp.attach, ifindex)  # swaps in the new program
        assert _exchange(_socket(client, socket.AF_INET6), (server6, PROXIED)).local == server6
        assert dp.interfaces()[ifindex][1] & abi.PM_IF_F_CLSACT_OURS  # bookkeeping survived the restart
    finally:
        _in(node, routing.remove)
        _in(node, dp.close)
        proxy.close()
        real.close()
    assert _in(node, _kernel_leftovers, ifindex) == {"clsact": False, "filter": False, "rules": [], "routes": 0}
    assert not os.path.exists(pin_dir)


def test_agent_gone_passes_or_drops(lab) -> None:
    """No listener: a SYN on a fail-open plane passes to its original destination (the server pod
    answers); on a fail-closed plane it is dropped (the connect times out)."""
    node, client, server = lab.node_ns, lab.pod_ns("client"), lab.pod_ns("server")
    server4 = lab.pod_addr("server", "oam", 4)
    ifindex = _in(node, _ifindex, lab.node_ifname("client", "oam"))
    real = EchoServer(_in(server, _dual_stack_listener, PROXIED, False))
    dp = Datapath()
    try:
        _in(node, dp.attach, ifindex)
        dp.set_interface(ifindex, PLANE)
        dp.sync_policy({PolicyRule(PLANE, PROXIED): Action.PROXY})
        _in(node, routing.install)
        dp.set_plane(PLANE, PROXY_PORT, SNIFF_PORT, Action.BYPASS, fail_closed=False)
        assert _exchange(_socket(client, socket.AF_INET), (server4, PROXIED)).local == server4

        dp.set_plane(PLANE, PROXY_PORT, SNIFF_PORT, Action.BYPASS, fail_closed=True)
        sock = _socket(client, socket.AF_INET)
        with sock, pytest.raises(TimeoutError):
            sock.settimeout(1.5)
            sock.connect((server4, PROXIED))
        assert dp.counters()[(PLANE, Action.DROP)][0] >= 1
    finally:
        _in(node, routing.remove)
        _in(node, dp.close)
        real.close()
    assert _in(node, _kernel_leftovers, ifindex) == {"clsact": False, "filter": False, "rules": [], "routes": 0}
