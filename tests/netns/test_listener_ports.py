"""Issue 11 finding 7 end to end. (a) A pod cannot open a connection straight to a plane's proxy or sniff
listener at the node's address (an oam pod filled media's connection budget that way); intercepted traffic still
reaches the same listeners, v4 and v6. (b) One pod cannot take its own plane's connection budget."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from planemesh.labs.netns import call_in
from planemesh.labs.traffic import http_requests
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import AgentLab, eventually, running_agent

pytestmark = pytest.mark.netns
LISTENER_PORTS = (15001, 15002, 15011, 15012)  # oam proxy/sniff, media proxy/sniff (model/default-config.yaml)


def _connect(address: str, port: int, timeout: float) -> str:
    """'connected', 'refused' (RST) or 'timeout' (the SYN was dropped)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        return "connected"


def test_direct_connects_to_listener_ports_are_dropped(run_prefix: str) -> None:
    with running_agent(f"{run_prefix}lp") as env:
        _check(env)


def _check(env: AgentLab) -> None:
    # Intercepted HTTP works on both planes and families before and after the direct attempts.
    for plane in ("oam", "media"):
        for version in (4, 6):
            assert http_requests(env.client_ns, env.server(plane, version), 80, ["/"]).status == [200]
    targets = [
        (env.lab.node_addr(plane, version), port)
        for plane in ("oam", "media")
        for version in (4, 6)
        for port in LISTENER_PORTS
    ]
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        outcomes = list(pool.map(lambda t: call_in(env.client_ns, _connect, t[0], t[1], 3.0), targets))
    assert dict(zip(targets, outcomes, strict=True)) == dict.fromkeys(targets, "timeout")
    for plane in ("oam", "media"):
        for version in (4, 6):
            assert http_requests(env.client_ns, env.server(plane, version), 80, ["/"]).status == [200]

    def drops() -> dict[str, int]:
        planes = env.planes()
        return {name: planes[name]["counters"]["bpf_packets"].get("listener_port_drop", 0) for name in planes}

    # Each plane counted its own pods' SYNs (8 each, plus SYN retransmits during the 3 s wait).
    def enough() -> dict[str, int] | None:
        seen = drops()
        return seen if all(n >= 8 for n in seen.values()) else None

    assert eventually(enough, timeout=10), drops()

    # The workers report their overload state and memory (agent/proxy/overload.py) through the agent's /stats.
    def overload_rows() -> list[dict] | None:
        _, stats = env.admin.get_json("/stats?format=json")
        rows = stats.get("overload", [])
        return rows if {r["plane"] for r in rows} == {"oam", "media"} else None

    rows = eventually(overload_rows, timeout=10)
    assert rows, env.admin.get_json("/stats?format=json")
    for row in rows:  # an idle worker: well inside its 256 MiB, nothing shed
        assert row["workers_soft"] == 0 and row["shed_requests"] == 0 and row["shed_connections"] == 0
        assert 0 <= row["memory_bytes"] < 64 << 20  # growth since the proxy started
    metrics = env.admin.get("/stats").body.decode()
    assert 'planemesh_overload_workers{level="soft",plane="oam"} 0.0' in metrics


def _open_idle(address: str, port: int, n: int) -> list[socket.socket]:
    return [socket.create_connection((address, port), timeout=10) for _ in range(n)]


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(0.5)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_one_pod_cannot_take_its_planes_connection_budget(run_prefix: str, tmp_path: Path) -> None:
    """Finding 7b end to end: the client pod opens idle connections through interception (server:80 on oam)
    until its share is used up; a second pod on the same plane is served without a single error."""
    raw = yaml.safe_load(default_config_text())
    for plane in raw["planes"]:
        if plane["name"] == "oam":
            plane["sla"] = {**plane.get("sla", {}), "max_connections": 64, "max_connections_per_source": 16,
                            "idle_connection_timeout_s": 60}  # fmt: skip
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(raw))
    with running_agent(f"{run_prefix}ps", ["--config", str(config)]) as env:
        env.lab.add_pod("other", ("oam",))
        other_ns = env.lab.pod_ns("other")
        server = env.server("oam", 4)
        # The new pod's interface is seen and intercepted (x-forwarded-for: the proxy saw it).
        assert eventually(lambda: _proxied(other_ns, server), timeout=10)
        idle = call_in(env.client_ns, _open_idle, server, 80, 80)
        try:
            refused = call_in(env.client_ns, lambda: sum(_closed(s) for s in idle))
            assert refused == 80 - 16  # the client pod keeps its share, the rest got 503 and were closed
            statuses = [http_requests(other_ns, server, 80, [f"/o{i}"]).status[0] for i in range(30)]
            assert statuses == [200] * 30
        finally:
            for sock in idle:
                sock.close()


def _proxied(ns: str, server: str) -> bool:
    try:
        r = http_requests(ns, server, 80, ["/probe"], timeout=2)
    except OSError:
        return False
    return r.status == [200] and "x-forwarded-for" in r.seen(0)["headers"]
