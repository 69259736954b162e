"""SIGHUP reloads the static configuration: a bad file changes nothing, a good one applies as a diff."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from planemesh.labs.traffic import http_requests
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import eventually, running_agent

pytestmark = pytest.mark.netns


def test_sighup_reload(run_prefix: str, tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(default_config_text())
    with running_agent(f"{run_prefix}s", ["--config", str(config)]) as env:
        dst = env.server("oam", 4)

        def proxied() -> bool:
            return "x-request-id" in http_requests(env.client_ns, dst, 80, ["/"]).seen(0)["headers"]

        assert proxied()
        config.write_text("planes: [{name: oam}]\n")
        env.agent.send_signal(signal.SIGHUP)
        assert eventually(lambda: "keeping the running configuration" in env.agent_output(), timeout=5)
        assert proxied() and env.agent.poll() is None

        raw = yaml.safe_load(default_config_text())
        for lsn in raw["listeners"]:
            if lsn["port"] == 80:
                lsn["protocol"] = "tcp"  # port 80 becomes plain TCP: bypassed in the kernel from now on
        config.write_text(yaml.safe_dump(raw))
        env.agent.send_signal(signal.SIGHUP)
        assert eventually(lambda: not proxied(), timeout=5)
        seen = http_requests(env.client_ns, dst, 80, ["/"]).seen(0)
        assert seen["peer"] == env.client("oam", 4)
        assert http_requests(env.client_ns, env.server("media", 6), 80, ["/"]).status == [200]
