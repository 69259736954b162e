"""Issue 11 finding 1: a stalled worker and a config push (xDS) or SIGHUP (static) never take the agent down.

The agent polls worker stats every 0.5 s with a 2 s deadline; a worker stopped for 3 s used to answer those
polls late, the late reply was read as the answer to the next snapshot push, and the agent exited: every
plane then fell open (a request the config answers 403 got 200 from the server).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import yaml

from planemesh.labs.traffic import http_requests
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import AgentLab, eventually, running_agent
from tests.netns.faults import stopped, wait_worker, worker_pids
from tests.netns.test_agent_xds import PASSTHROUGH, resources, start_server, write

pytestmark = pytest.mark.netns

DENY = {"direct_response": {"status": 403, "body": {"inline_string": "denied by the pushed config"}}}
PLANES = ("oam", "media")


def xds_bootstrap(path: Path, sock: Path) -> Path:
    planes = yaml.safe_load(default_config_text())["planes"]
    boot = {"node": {"id": "lab-node"}, "server": {"address": f"unix://{sock}"},
            "timing": {"backoff_base_s": 0.1, "backoff_max_s": 0.5}, "planes": planes}  # fmt: skip
    path.write_text(yaml.safe_dump(boot))
    return path


def statuses(env: AgentLab) -> dict[tuple[str, int], int | None]:
    """One GET / on port 80 per plane and address family."""
    out = {}
    for plane in PLANES:
        for version in (4, 6):
            got = http_requests(env.client_ns, env.server(plane, version), 80, ["/"], timeout=5).status
            out[(plane, version)] = got[0] if got else None
    return out


def all_answer(env: AgentLab, code: int) -> bool:
    return set(statuses(env).values()) == {code}


def test_xds_push_after_a_stalled_worker_applies_and_keeps_policy(run_prefix: str, tmp_path: Path) -> None:
    res = tmp_path / "resources"
    res.mkdir()
    write(res / "config.yaml", resources(PASSTHROUGH))
    sock = tmp_path / "xds.sock"
    server = start_server(res, sock)
    try:
        with running_agent(f"{run_prefix}w", ["--bootstrap", str(xds_bootstrap(tmp_path / "b.yaml", sock))]) as env:
            assert eventually(lambda: all_answer(env, 200), 10)
            oam = wait_worker(env.agent.pid, "oam")
            with stopped(oam):
                time.sleep(3.0)  # stats polls to it time out; their replies come after SIGCONT
                write(res / "config.yaml", resources(DENY))
                time.sleep(0.5)
            assert eventually(lambda: all_answer(env, 403), 10), statuses(env)
            assert env.agent.poll() is None, env.agent_output()
            time.sleep(1.5)  # a few more stats polls and their (late) replies: still no confusion
            assert statuses(env) == dict.fromkeys(statuses(env), 403), "fell open: the agent lost its policy"
            assert worker_pids(env.agent.pid, "oam") == [oam], "a 3 s stall does not restart the worker"

            # A worker stuck for good is restarted (same listening socket) and gets the newest config; the
            # push applies on the other planes meanwhile.
            media = wait_worker(env.agent.pid, "media")
            with stopped(media):
                time.sleep(2.5)
                write(res / "config.yaml", resources(PASSTHROUGH))
                assert eventually(lambda: statuses(env)[("oam", 4)] == 200, 5)
                new_media = wait_worker(env.agent.pid, "media", timeout=20, not_pid=media)
            assert new_media != media
            assert eventually(lambda: all_answer(env, 200), 15), statuses(env)
            assert env.agent.poll() is None, env.agent_output()
            assert "has not answered" in env.agent_output()
    finally:
        server.kill()
        server.wait()


def test_sighup_after_a_stalled_worker_reloads_and_keeps_proxying(run_prefix: str, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(default_config_text())
    with running_agent(f"{run_prefix}h", ["--config", str(config)]) as env:

        def proxied(plane: str, version: int, port: int) -> bool:
            seen = http_requests(env.client_ns, env.server(plane, version), port, ["/"], timeout=5).seen(0)
            return "x-request-id" in seen["headers"]

        everywhere = [(p, v) for p in PLANES for v in (4, 6)]
        assert all(proxied(p, v, 80) for p, v in everywhere)
        assert not any(proxied(p, v, 9080) for p, v in everywhere)  # undeclared: bypassed
        raw = yaml.safe_load(default_config_text())
        for lsn in raw["listeners"]:
            if lsn["port"] == 80:
                lsn["protocol"] = "tcp"  # 80 becomes plain TCP: bypassed from now on
        raw["listeners"] += [{"plane": p, "port": 9080, "protocol": "http"} for p in PLANES]  # and 9080 proxied
        config.write_text(yaml.safe_dump(raw))
        oam = wait_worker(env.agent.pid, "oam")
        with stopped(oam):
            time.sleep(3.0)
            env.agent.send_signal(signal.SIGHUP)
            time.sleep(0.5)
        assert eventually(lambda: not any(proxied(p, v, 80) for p, v in everywhere), 10)
        time.sleep(1.5)
        assert env.agent.poll() is None, env.agent_output()
        # 9080 is proxied on every plane now: the agent and its workers are up, nothing fell open.
        assert all(proxied(p, v, 9080) for p, v in everywhere)
        assert "applied snapshot static" in env.agent_output()
