"""Interfaces that come and go while the agent runs; the agent dying never blackholes traffic."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from planemesh.agent.demo import start_agent
from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import http_requests, tcp_echo
from tests.netns.agent_lab import AgentLab, eventually, running_agent

pytestmark = pytest.mark.netns


def attached(env: AgentLab, ifname: str) -> bool:
    out = ns_tools.run(env.lab.node_ns, ["tc", "filter", "show", "dev", ifname, "ingress"], check=False).stdout
    return "pm_tc_ingress" in out


def test_plane_interfaces_plugged_at_run_time_are_adopted_and_released(run_prefix: str) -> None:
    with running_agent(f"{run_prefix}h") as env:
        started = time.monotonic()
        env.lab.add_pod("extra", ("oam", "media"))
        assert eventually(
            lambda: attached(env, "extra-oam") and attached(env, "extra-media"), timeout=2.0, interval=0.01
        )
        adopted_after = time.monotonic() - started
        for plane, version in (("oam", 4), ("media", 6)):
            r = http_requests(env.lab.pod_ns("extra"), env.server(plane, version), 80, ["/from-extra"])
            assert r.status == [200]
            assert "x-request-id" in r.seen(0)["headers"], "the new pod's traffic goes through the plane's proxy"
            assert r.seen(0)["headers"]["x-forwarded-for"] == env.lab.pod_addr("extra", plane, version)

        def listed() -> set[str]:
            return {i["name"] for view in env.planes().values() for i in view["interfaces"]}

        assert {"extra-oam", "extra-media"} <= listed()
        env.lab.remove_pod("extra")
        assert eventually(lambda: not ({"extra-oam", "extra-media"} & listed()), timeout=2.0)
        # The other interfaces were never touched.
        assert attached(env, "client-oam") and attached(env, "server-media")
        assert http_requests(env.client_ns, env.server("oam", 4), 80, ["/"]).status == [200]
        print(f"hotplug: filters attached {adopted_after * 1000:.0f} ms after the pod's links were created")


def test_sigkill_fails_open_and_a_new_agent_takes_over(run_prefix: str, tmp_path: Path) -> None:
    with running_agent(f"{run_prefix}k") as env:
        proxied = http_requests(env.client_ns, env.server("oam", 4), 80, ["/"])
        assert "x-request-id" in proxied.seen(0)["headers"]
        env.agent.send_signal(signal.SIGKILL)
        env.agent.wait(10)
        # Workers die with the agent (PR_SET_PDEATHSIG): nothing listens on the plane ports any more.
        assert eventually(lambda: "15001" not in ns_tools.run(env.lab.node_ns, ["ss", "-ltn"]).stdout, timeout=5)
        for plane, version in (("oam", 4), ("media", 6)):
            bypass = tcp_echo(env.client_ns, env.server(plane, version), 9000, size=256 * 1024)
            assert bypass.echoed_ok and bypass.peer_seen_by_server == env.client(plane, version)
            # Fail-open: a new connection to a proxied port reaches its original destination directly.
            direct = http_requests(env.client_ns, env.server(plane, version), 80, ["/after-kill"])
            assert direct.status == [200]
            assert direct.seen(0)["peer"] == env.client(plane, version)
            assert "x-request-id" not in direct.seen(0)["headers"]
        # A new agent adopts the node again: attached programs are replaced, routes re-installed.
        again = start_agent(env.lab, tmp_path)
        try:
            back = http_requests(env.client_ns, env.server("media", 4), 80, ["/after-restart"])
            assert "x-request-id" in back.seen(0)["headers"]
            assert tcp_echo(env.client_ns, env.server("media", 4), 9000).echoed_ok
        finally:
            assert ns_tools.stop(again) == 0


def test_routed_planes_find_pod_interfaces_by_their_host_routes(run_prefix: str, tmp_path: Path) -> None:
    """DaemonSet mode on Multus/Knitter nodes: host-side veth names are arbitrary, the routes are not."""
    import yaml

    from planemesh.model.static_config import default_config_text

    raw = yaml.safe_load(default_config_text())
    for plane in raw["planes"]:
        plane["interfaces"] = ["@routed"]
    config = tmp_path / "routed.yaml"
    config.write_text(yaml.safe_dump(raw))
    with running_agent(f"{run_prefix}d", ["--config", str(config)]) as env:
        assert attached(env, "client-oam") and attached(env, "server-media")
        env.lab.add_pod("late", ("media",))  # appears after the agent started
        assert eventually(lambda: attached(env, "late-media"), timeout=2.0, interval=0.01)
        r = http_requests(env.lab.pod_ns("late"), env.server("media", 6), 80, ["/late"])
        assert "x-request-id" in r.seen(0)["headers"]
