"""The multi-plane forwarding loop (why Istio 1.0 ran out of sockets on telecom nodes), and planemesh not looping.

The node is VRF-like: each plane's routes live in the plane's own table, `iif` rules steer forwarded
traffic, and the main table only has a default route via a router on the OAM plane. A client on plane
sig asks for a server on plane sig through the proxy. With planes that name no routing table (naive),
the proxy's upstream connection is routed by the main table: out to the router, which sends it back
into the node on its sig interface, where it is intercepted again (the skb mark did not survive the
trip), and again, and again. With each plane's table configured, the upstream stays on plane sig.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from planemesh.labs import Lab
from planemesh.labs.traffic import http_requests
from tests.netns.agent_lab import AgentLab, eventually
from tests.netns.plane_labs import (
    agent_with,
    bpf_packets,
    config,
    established,
    forwarded,
    lab_with_servers,
    plane,
    plane_rules,
)

pytestmark = pytest.mark.netns

LAB = {
    "name": "loop",
    "node": {
        "default_via": {"pod": "router", "plane": "oam"},  # like an OAM gateway
        # The hairpinned upstream comes back with one of the node's own source addresses: accept it (v4).
        "sysctls": {"net.ipv4.conf.all.accept_local": 1},
    },
    "planes": [
        {"name": "oam", "ipv4": "198.18.1.0/24", "ipv6": "fd00:18:1::/64", "table": 101},
        {"name": "sig", "ipv4": "198.18.2.0/24", "ipv6": "fd00:18:2::/64", "table": 102},
    ],
    "pods": [
        {"name": "client", "planes": ["sig"]},
        {"name": "server", "planes": ["sig"]},
        {"name": "router", "planes": ["oam", "sig"], "forwarding": True},
    ],
}
CIDRS = {"oam": ["198.18.1.0/24", "fd00:18:1::/64"], "sig": ["198.18.2.0/24", "fd00:18:2::/64"]}
LOOPED = 50  # intercepted SYNs for one request that prove the loop (one is right)


def agent_config(tables: bool) -> dict[str, Any]:
    return config([
        plane("oam", 1, CIDRS["oam"], **({"table": 101} if tables else {})),
        plane("sig", 2, CIDRS["sig"], **({"table": 102} if tables else {})),
    ])  # fmt: skip


@pytest.fixture(scope="module")
def lab(run_prefix: str):
    with lab_with_servers(LAB, f"{run_prefix}o") as built:
        yield built


def listener_syns(env: AgentLab) -> int:
    return bpf_packets(env)["sig"].get("listener", 0)


@pytest.mark.parametrize("version", [4, 6])
def test_naive_planes_loop_through_the_gateway(lab: Lab, tmp_path: Path, version: int) -> None:
    server = lab.pod_addr("server", "sig", version)
    outcome: dict[str, Any] = {}

    def one_request() -> None:
        try:
            outcome["status"] = http_requests(lab.pod_ns("client"), server, 80, ["/once"], timeout=4).status
        except Exception as exc:  # the loop never answers: timeout or reset
            outcome["error"] = exc

    router_before = forwarded(lab.pod_ns("router"))
    with agent_with(lab, tmp_path, agent_config(tables=False)) as env:
        before = listener_syns(env)
        started = time.monotonic()
        client = threading.Thread(target=one_request, daemon=True)
        client.start()
        eventually(lambda: listener_syns(env) - before >= LOOPED, timeout=3.0, interval=0.05)
        looped, elapsed = listener_syns(env) - before, time.monotonic() - started
    # The agent is gone (programs detached): the loop is broken and the client gives up.
    client.join(10)
    print(f"naive planes, IPv{version}: one request was intercepted {looped} times in {elapsed:.2f} s")
    assert looped >= LOOPED, f"one request, {looped} intercepted connections: expected the loop"
    assert forwarded(lab.pod_ns("router")) - router_before >= LOOPED, "each round went through the gateway"
    assert outcome.get("status") != [200]


def test_plane_tables_keep_the_upstream_on_its_plane(lab: Lab, tmp_path: Path) -> None:
    router = lab.pod_ns("router")
    with agent_with(lab, tmp_path, agent_config(tables=True)) as env:
        rules = plane_rules(lab.node_ns)
        assert "fwmark 0x800001/0x80003f lookup 101" in rules and "fwmark 0x800002/0x80003f lookup 102" in rules
        for version in (4, 6):
            server, node = lab.pod_addr("server", "sig", version), lab.node_addr("sig", version)
            before, router_before = listener_syns(env), forwarded(router)
            r = http_requests(lab.pod_ns("client"), server, 80, ["/once"], timeout=5)
            assert r.status == [200]
            assert "x-request-id" in r.seen(0)["headers"], "it went through the proxy"
            assert r.seen(0)["peer"] == node, "the server sees the node's own address on plane sig"
            assert listener_syns(env) - before == 1, "one request, one intercepted connection"
            # Exactly one upstream connection (kept alive in the pool), from the node's sig address.
            peers = [peer for _, peer in established(lab.pod_ns("server"), 80) if node in peer]
            assert len(peers) == 1, peers
            # Neither the upstream nor the replies to the client took the OAM gateway.
            assert forwarded(router) == router_before
        # A new configuration is applied as a diff: oam without a table loses its rule, sig keeps its own.
        (tmp_path / "agent.yaml").write_text((tmp_path / "agent.yaml").read_text().replace("table: 101", "table: 111"))
        env.agent.send_signal(1)  # SIGHUP: reload the static configuration
        assert eventually(lambda: "lookup 111" in plane_rules(lab.node_ns), timeout=5)
        rules = plane_rules(lab.node_ns)
        assert "lookup 101" not in rules and "fwmark 0x800002/0x80003f lookup 102" in rules
    assert plane_rules(lab.node_ns) == "", "a stopping agent removes its plane rules"


def test_plane_rules_survive_a_hand_over_and_go_with_a_detaching_close(lab: Lab) -> None:
    """KernelDataPath.close(detach=False) (hand-over, fail-open) leaves the plane rules routing; the next
    agent's snapshot is diffed against what it finds; close(detach=True) removes them."""
    from planemesh.agent.kernel import KernelDataPath
    from planemesh.labs.netns import call_in
    from planemesh.model.static_config import snapshot_from_dict

    with_tables = snapshot_from_dict(agent_config(tables=True))
    sig_only = config([plane("oam", 1, CIDRS["oam"]), plane("sig", 2, CIDRS["sig"], table=102)])
    sig_table_only = snapshot_from_dict(sig_only)

    def scenario() -> list[str]:
        seen = []
        first = KernelDataPath()
        first.open()
        first.apply(with_tables)
        seen.append(plane_rules(lab.node_ns))
        first.close(detach=False)
        seen.append(plane_rules(lab.node_ns))
        second = KernelDataPath()
        second.open()
        second.apply(sig_table_only)
        seen.append(plane_rules(lab.node_ns))
        second.close(detach=True)
        seen.append(plane_rules(lab.node_ns))
        return seen

    installed, kept, diffed, removed = call_in(lab.node_ns, scenario)
    assert installed.count("lookup 101") == 2 and installed.count("lookup 102") == 2  # v4 and v6 each
    assert kept == installed
    assert "lookup 101" not in diffed and diffed.count("lookup 102") == 2
    assert removed == ""
