"""Helpers for the network-plane lab tests: labs built from dicts, agent configs, agents, counters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from planemesh.agent.demo import start_agent, start_servers
from planemesh.labs import Lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.model import lab_from_dict
from tests.netns.agent_lab import AgentLab

TCP_SLOTS = ("proxy", "bypass", "sniff", "listener", "established", "no_socket", "no_listener", "cross_plane_drop",
             "cross_plane")  # fmt: skip


@contextlib.contextmanager
def lab_with_servers(spec: dict[str, Any], prefix: str) -> Iterator[Lab]:
    """The lab up, the lab servers (HTTP 80/9080, TCP 9000/9001) running in its `server` pod."""
    lab = Lab(lab_from_dict(spec), prefix)
    with lab:
        servers = start_servers(lab)
        try:
            yield lab
        finally:
            for proc in servers:
                ns_tools.stop(proc)


def plane(name: str, plane_id: int, cidrs: list[str], **extra: Any) -> dict[str, Any]:
    """A plane of the agent's static config; node-side interfaces are `<pod>-<plane>`."""
    port = 15001 + 10 * (plane_id - 1)
    return {"name": name, "id": plane_id, "interfaces": [f"*-{name}"], "cidrs": cidrs, "proxy_port": port,
            "sniff_port": port + 1, **extra}  # fmt: skip


def config(planes: list[dict[str, Any]], http: int = 80, tcp: int = 9000) -> dict[str, Any]:
    listeners = [{"plane": p["name"], "port": http, "protocol": "http"} for p in planes]
    listeners += [{"plane": p["name"], "port": tcp, "protocol": "tcp"} for p in planes]
    return {"planes": planes, "listeners": listeners}


@contextlib.contextmanager
def agent_with(lab: Lab, workdir: Path, cfg: dict[str, Any], *extra: str) -> Iterator[AgentLab]:
    """The real agent in the lab's node namespace on a static config (written to workdir/agent.yaml)."""
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    agent = start_agent(lab, workdir, ["--config", str(path), "--drain-timeout", "0.5", *extra])
    try:
        yield AgentLab(lab, workdir, agent)
    finally:
        ns_tools.stop(agent)


def bpf_packets(env: AgentLab) -> dict[str, dict[str, int]]:
    """Per plane: BPF counter slot -> packets, read live from the agent."""
    return {name: view["counters"]["bpf_packets"] for name, view in env.planes().items()}


def tcp_slots(packets: dict[str, int]) -> dict[str, int]:
    return {slot: n for slot, n in packets.items() if slot in TCP_SLOTS}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def plane_rules(ns: str) -> str:
    """The node's fwmark rules at planemesh's plane priority (v4 and v6)."""
    out = ""
    for family in ("-4", "-6"):
        out += ns_tools.run(ns, ["ip", family, "rule", "show", "priority", "1001"]).stdout
    return out


def established(ns: str, port: int) -> list[tuple[str, str]]:
    """(local, peer) of the established TCP connections on local `port` inside `ns`."""
    out = ns_tools.run(ns, ["ss", "-Htn", "state", "established", f"( sport = :{port} )"]).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            rows.append((parts[2], parts[3]))
    return rows


def forwarded(ns: str) -> int:
    """Datagrams this namespace forwarded so far, IPv4 and IPv6 (a router pod's)."""

    def read() -> int:
        total = 0
        with open("/proc/thread-self/net/snmp") as f:
            lines = [line.split() for line in f if line.startswith("Ip:")]
        total += int(lines[1][lines[0].index("ForwDatagrams")])
        with open("/proc/thread-self/net/snmp6") as f:
            total += next(int(v) for k, v in (line.split() for line in f) if k == "Ip6OutForwDatagrams")
        return total

    return ns_tools.call_in(ns, read)


def socket_marks(ns: str, peer: str) -> list[int]:
    """SO_MARK of the TCP sockets in `ns` connected to `peer` (ss shows fwmark for marked sockets)."""
    out = ns_tools.run(ns, ["ss", "-Htne", "dst", f"[{peer}]" if ":" in peer else peer]).stdout
    marks = []
    for field in out.split():
        if field.startswith("fwmark:"):
            marks.append(int(field.removeprefix("fwmark:"), 16))
    return marks
