"""Lifecycle under continuous wrk load: hot upgrade without a failed request, SIGKILL and restart never
touching bypassed traffic, and proxied traffic falling open at once."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from bench.common import WrkResult, parse_wrk
from planemesh.agent.demo import BYPASS_HTTP_PORT, start_agent
from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import host_port, http_requests
from tests.netns.agent_lab import AgentLab, running_agent

pytestmark = pytest.mark.netns


def start_wrk(env: AgentLab, port: int, seconds: int, connections: int = 8) -> subprocess.Popen:
    url = f"http://{host_port(env.server('oam', 4), port)}/load"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    return ns_tools.popen(env.client_ns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, name: str) -> WrkResult:
    out, _ = proc.communicate(timeout=60)
    result = parse_wrk(name, out)
    print(f"{name}: {result.requests} requests, {result.errors} errors (socket errors + non-2xx)")
    return result


def test_hot_upgrade_under_load_fails_no_request(run_prefix: str, tmp_path: Path) -> None:
    with running_agent(f"{run_prefix}u") as env:
        proxied = start_wrk(env, 80, seconds=6)
        bypassed = start_wrk(env, BYPASS_HTTP_PORT, seconds=6)
        time.sleep(1.5)
        successor = start_agent(env.lab, tmp_path)  # takes the listening sockets over, the old one drains
        try:
            assert env.agent.wait(20) == 0, env.agent_output()
            assert "left to the successor" in env.agent_output()
            p, b = finish(proxied, "proxied across the upgrade"), finish(bypassed, "bypassed across the upgrade")
            assert p.requests > 100 and b.requests > 100
            assert p.errors == 0 and b.errors == 0
            after = http_requests(env.client_ns, env.server("media", 6), 80, ["/after-upgrade"])
            assert "x-request-id" in after.seen(0)["headers"], "the successor proxies"
        finally:
            assert ns_tools.stop(successor) == 0


def test_sigkill_and_restart_under_load(run_prefix: str, tmp_path: Path) -> None:
    with running_agent(f"{run_prefix}r") as env:
        bypassed = start_wrk(env, BYPASS_HTTP_PORT, seconds=7)
        time.sleep(1.0)
        env.agent.send_signal(signal.SIGKILL)
        env.agent.wait(10)
        # Fail-open at once: new proxied connections reach their original destination directly.
        right_after = finish(start_wrk(env, 80, seconds=2), "proxied right after SIGKILL (fail-open)")
        assert right_after.requests > 100 and right_after.errors == 0
        restarted = start_agent(env.lab, tmp_path)
        try:
            b = finish(bypassed, "bypassed across SIGKILL and restart")
            assert b.requests > 100 and b.errors == 0
            again = finish(start_wrk(env, 80, seconds=2), "proxied after restart")
            assert again.requests > 100 and again.errors == 0
            seen = http_requests(env.client_ns, env.server("oam", 4), 80, ["/after-restart"]).seen(0)
            assert "x-request-id" in seen["headers"], "the restarted agent proxies again"
        finally:
            assert ns_tools.stop(restarted) == 0
