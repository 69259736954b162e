"""SIGHUP under --bootstrap (docs/configuration.md, "Signals"): the agent re-reads the bootstrap and, when it
changed, reconnects with it; a broken bootstrap changes nothing. In a lab, against two real management servers."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import yaml

from planemesh.labs.traffic import http_requests
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import eventually, running_agent
from tests.netns.test_agent_xds import PASSTHROUGH, TEAPOT, resources, start_server, write

pytestmark = pytest.mark.netns


def write_bootstrap(path: Path, sock: Path, node_id: str) -> None:
    planes = yaml.safe_load(default_config_text())["planes"]
    path.write_text(yaml.safe_dump({
        "node": {"id": node_id},
        "server": {"address": f"unix://{sock}"},
        "timing": {"backoff_base_s": 0.1, "backoff_max_s": 0.5},
        "planes": planes,
    }))  # fmt: skip


def test_sighup_rereads_the_bootstrap_and_reconnects_and_a_bad_one_changes_nothing(
    run_prefix: str, tmp_path: Path
) -> None:
    servers = []
    for name, route in (("a", PASSTHROUGH), ("b", TEAPOT)):
        (tmp_path / name).mkdir()
        write(tmp_path / name / "config.yaml", resources(route))
        servers.append(start_server(tmp_path / name, tmp_path / f"{name}.sock"))
    boot = tmp_path / "bootstrap.yaml"
    write_bootstrap(boot, tmp_path / "a.sock", "node-a")
    try:
        with running_agent(f"{run_prefix}h", ["--bootstrap", str(boot)]) as env:
            dst = env.server("oam", 4)

            def status() -> int:
                return http_requests(env.client_ns, dst, 80, ["/"]).status[0]

            assert eventually(lambda: status() == 200, 10), "server a's config (passthrough)"

            boot.write_text("node: {id: [broken\n")  # not YAML: refused, nothing changes
            env.agent.send_signal(signal.SIGHUP)
            assert eventually(lambda: "SIGHUP: keeping the running configuration" in env.agent_output(), 5), \
                env.agent_output()[-2000:]
            assert status() == 200 and env.admin.get_json("/status")[1]["xds_connected"]

            write_bootstrap(boot, tmp_path / "b.sock", "node-b")  # another server, another node id
            env.agent.send_signal(signal.SIGHUP)
            assert eventually(lambda: status() == 418, 10), "server b's config after SIGHUP"
            assert "reconnecting to unix://" in env.agent_output() and "as node node-b" in env.agent_output()

            env.agent.send_signal(signal.SIGHUP)  # the same file again: the stream stays
            assert eventually(lambda: "bootstrap unchanged" in env.agent_output(), 5)
            assert status() == 418
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(10)
