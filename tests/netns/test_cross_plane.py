"""Cross-plane policy in a real lab: a connection arriving on plane oam for an address of plane sig is refused
(default), whatever the port's action; once oam may forward to sig, HTTP is proxied out as plane sig (its source
address, its mark) and plain TCP is forwarded by the kernel. The permission is one-way."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from planemesh.ebpf.abi import PM_MARK_OWN
from planemesh.labs import Lab
from planemesh.labs.netns import call_in
from planemesh.labs.traffic import http_requests, tcp_echo
from tests.netns.agent_lab import AgentLab, eventually
from tests.netns.plane_labs import (
    agent_with,
    bpf_packets,
    config,
    delta,
    lab_with_servers,
    plane,
    socket_marks,
    tcp_slots,
)

pytestmark = pytest.mark.netns

LAB = {
    "name": "cross",
    "planes": [
        {"name": "oam", "ipv4": "198.18.1.0/24", "ipv6": "fd00:18:1::/64"},
        {"name": "sig", "ipv4": "198.18.2.0/24", "ipv6": "fd00:18:2::/64"},
    ],
    "pods": [
        {"name": "client", "planes": ["oam"], "gateway": "oam"},  # reaches other planes via the node
        {"name": "server", "planes": ["sig"], "gateway": "sig"},
    ],
}
OAM, SIG = 1, 2


def agent_config(oam_forwards_to_sig: bool) -> dict:
    return config([
        plane("oam", OAM, ["198.18.1.0/24", "fd00:18:1::/64"], forward_to=["sig"] if oam_forwards_to_sig else []),
        plane("sig", SIG, ["198.18.2.0/24", "fd00:18:2::/64"]),
    ])  # fmt: skip


def connect_outcome(address: str, port: int, timeout: float = 1.0) -> str:
    """'refused' (an RST came back: the SYN got through), 'dropped' (nothing came back) or 'connected'."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "dropped"
    return "connected"


@pytest.fixture(scope="module")
def lab(run_prefix: str):
    with lab_with_servers(LAB, f"{run_prefix}x") as built:
        yield built


def tcp_counters(env: AgentLab) -> dict[str, dict[str, int]]:
    return {name: tcp_slots(packets) for name, packets in bpf_packets(env).items()}


def test_refused_by_default_then_forwarded_when_allowed(lab: Lab, tmp_path: Path) -> None:
    client_ns = lab.pod_ns("client")
    with agent_with(lab, tmp_path, agent_config(oam_forwards_to_sig=False)) as env:
        for version in (4, 6):
            server = lab.pod_addr("server", "sig", version)
            before = tcp_counters(env)
            assert call_in(client_ns, connect_outcome, server, 80) == "dropped", "proxied port"
            assert call_in(client_ns, connect_outcome, server, 9000) == "dropped", "bypassed port"
            changed = {name: delta(before[name], now) for name, now in tcp_counters(env).items()}
            # Only SYNs were seen (retransmissions included), all refused on the arrival plane; nothing reached
            # the proxy or the kernel's forwarding.
            assert set(changed["oam"]) == {"cross_plane_drop"} and changed["oam"]["cross_plane_drop"] >= 2
            assert changed["sig"] == {}

        # oam may now forward to sig (a reload applies it as a diff).
        (tmp_path / "agent.yaml").write_text(
            (tmp_path / "agent.yaml").read_text().replace("forward_to: []", "forward_to: [sig]")
        )
        env.agent.send_signal(1)
        server4 = lab.pod_addr("server", "sig", 4)
        assert eventually(lambda: call_in(client_ns, connect_outcome, server4, 9001) == "connected", timeout=5)
        for version in (4, 6):
            server, node_sig = lab.pod_addr("server", "sig", version), lab.node_addr("sig", version)
            client = lab.pod_addr("client", "oam", version)
            before = tcp_counters(env)
            r = http_requests(client_ns, server, 80, ["/across"], timeout=5)
            assert r.status == [200]
            seen = r.seen(0)
            assert seen["headers"]["x-forwarded-for"] == client, "proxied by plane oam's worker"
            assert seen["peer"] == node_sig, "the upstream leaves with plane sig's source address"
            assert PM_MARK_OWN | SIG in socket_marks(lab.node_ns, server), "...and plane sig's mark"
            bypass = tcp_echo(client_ns, server, 9000, size=64 * 1024)
            assert bypass.echoed_ok and bypass.peer_seen_by_server == client, "forwarded by the kernel, unchanged"
            changed = {name: delta(before[name], now) for name, now in tcp_counters(env).items()}
            assert changed["oam"]["cross_plane"] == 2, "one counted SYN per connection"
            assert changed["oam"]["listener"] == 1 and changed["oam"]["bypass"] >= 1
            assert "cross_plane_drop" not in changed["oam"]
        # One-way: sig has no permission for oam's addresses.
        assert call_in(lab.pod_ns("server"), connect_outcome, lab.pod_addr("client", "oam", 6), 9000) == "dropped"
        assert tcp_counters(env)["sig"].get("cross_plane_drop", 0) >= 1
