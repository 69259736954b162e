"""Three planes (oam and sig dual-stack, media IPv6-only), two pods, the real agent, a VRF-like node (each
plane's routes only in its own table): per plane, HTTP is proxied out of that plane with the node's address
on it, plain TCP keeps the client's address, the BPF counters move on that plane only; a pod plugged in at
run time is adopted and, unplugged, released, while the other planes keep serving."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import pytest

from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import http_requests, tcp_echo
from tests.netns.agent_lab import AgentLab, eventually
from tests.netns.plane_labs import (
    agent_with,
    bpf_packets,
    config,
    delta,
    lab_with_servers,
    plane,
    plane_rules,
    tcp_slots,
)

pytestmark = pytest.mark.netns

CIDRS = {
    "oam": ["198.18.1.0/24", "fd00:18:1::/64"],
    "sig": ["198.18.2.0/24", "fd00:18:2::/64"],
    "media": ["fd00:18:3::/64"],  # IPv6 only
}
TABLES = {"oam": 101, "sig": 102, "media": 103}
LAB = {
    "name": "three",
    "planes": [
        {"name": name, **{f"ipv{'6' if ':' in c else '4'}": c for c in cidrs}, "table": TABLES[name]}
        for name, cidrs in CIDRS.items()
    ],
    "pods": [{"name": "client", "planes": list(CIDRS)}, {"name": "server", "planes": list(CIDRS)}],
}
CASES = [("oam", 4), ("oam", 6), ("sig", 4), ("sig", 6), ("media", 6)]


@pytest.fixture(scope="module")
def env(run_prefix: str):
    cfg = config([plane(name, i + 1, cidrs, table=TABLES[name]) for i, (name, cidrs) in enumerate(CIDRS.items())])
    with (
        lab_with_servers(LAB, f"{run_prefix}3") as lab,
        tempfile.TemporaryDirectory(prefix="pm-three-") as tmp,
        agent_with(lab, Path(tmp), cfg) as running,
    ):
        yield running


def tcp_counters(env: AgentLab) -> dict[str, dict[str, int]]:
    return {name: tcp_slots(packets) for name, packets in bpf_packets(env).items()}


@pytest.mark.parametrize(("name", "version"), CASES, ids=[f"{p}-v{v}" for p, v in CASES])
def test_each_plane_is_routed_and_counted_on_its_own(env: AgentLab, name: str, version: int) -> None:
    lab = env.lab
    server, client = env.server(name, version), env.client(name, version)
    before = tcp_counters(env)
    r = http_requests(env.client_ns, server, 80, ["/plane"])
    assert r.status == [200] and "x-request-id" in r.seen(0)["headers"], "proxied"
    assert r.seen(0)["peer"] == lab.node_addr(name, version), "upstream from the node's address on this plane"
    assert r.seen(0)["headers"]["x-forwarded-for"] == client
    bypass = tcp_echo(env.client_ns, server, 9000, size=256 * 1024)
    assert bypass.echoed_ok and bypass.peer_seen_by_server == client, "bypassed in the kernel, the client's address"
    changed = {plane: delta(before[plane], now) for plane, now in tcp_counters(env).items()}
    assert changed[name].get("listener") == 1 and changed[name].get("bypass", 0) > 0
    assert {plane: c for plane, c in changed.items() if plane != name and c} == {}, "other planes saw nothing"


def test_the_ipv6_only_plane_has_nothing_ipv4(env: AgentLab) -> None:
    media = env.planes()["media"]
    addresses = [a for iface in media["interfaces"] for a in iface["addresses"]]
    assert addresses and all(":" in a for a in addresses), addresses
    assert media["cidrs"] == ["fd00:18:3::/64"]
    rules = plane_rules(env.lab.node_ns)
    v4_rules = ns_tools.run(env.lab.node_ns, ["ip", "-4", "rule", "show", "priority", "1001"]).stdout
    assert "lookup 103" in rules and "lookup 103" not in v4_rules, "only an IPv6 rule for media's upstreams"
    assert "lookup 101" in v4_rules and "lookup 102" in v4_rules
    v4_routes = ns_tools.run(env.lab.node_ns, ["ip", "-4", "route", "show", "table", "103"], check=False).stdout
    assert v4_routes.strip() == ""
    assert bpf_packets(env)["media"].get("listener", 0) > 0
    pod_v4 = ns_tools.run(env.client_ns, ["ip", "-4", "-o", "addr", "show", "dev", "media"]).stdout
    assert pod_v4.strip() == ""


def test_a_pod_plugged_at_run_time_is_adopted_and_released(env: AgentLab) -> None:
    lab = env.lab
    stop = threading.Event()
    statuses: list[int] = []

    def oam_traffic() -> None:  # another plane, busy all along
        while not stop.is_set():
            try:
                statuses.extend(http_requests(env.client_ns, env.server("oam", 4), 80, ["/busy"], timeout=5).status)
            except OSError as exc:
                statuses.append(-1)
                print("oam request failed:", exc)
            time.sleep(0.01)

    def interfaces() -> set[str]:
        return {iface["name"] for view in env.planes().values() for iface in view["interfaces"]}

    busy = threading.Thread(target=oam_traffic, daemon=True)
    busy.start()
    try:
        lab.add_pod("late", ("sig", "media"))
        assert eventually(lambda: {"late-sig", "late-media"} <= interfaces(), timeout=3, interval=0.02)
        for name, version in (("sig", 4), ("media", 6)):
            before = bpf_packets(env)[name].get("listener", 0)
            r = http_requests(lab.pod_ns("late"), env.server(name, version), 80, ["/late"])
            assert r.status == [200] and "x-request-id" in r.seen(0)["headers"], "the new pod's traffic is proxied"
            assert r.seen(0)["headers"]["x-forwarded-for"] == lab.pod_addr("late", name, version)
            assert r.seen(0)["peer"] == lab.node_addr(name, version)
            assert bpf_packets(env)[name].get("listener", 0) == before + 1
        lab.remove_pod("late")
        assert eventually(lambda: not {"late-sig", "late-media"} & interfaces(), timeout=3, interval=0.02)
    finally:
        stop.set()
        busy.join(10)
    assert len(statuses) > 10 and set(statuses) == {200}, "plane oam was served throughout"
    assert {"client-oam", "client-sig", "client-media", "server-media"} <= interfaces(), "the others stay"
