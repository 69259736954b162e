"""The running agent as operators see it: systemd notifications, metrics that match the traffic,
the live config dump, and an admin endpoint no pod can reach."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from planemesh.agent.admin_client import AdminClient
from planemesh.agent.demo import default_xds_resources, start_agent, start_servers
from planemesh.labs import load_lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.netns import call_in
from planemesh.labs.traffic import http_requests
from tests.netns.agent_lab import eventually

pytestmark = pytest.mark.netns


def proxied_requests(admin: AdminClient, plane: str) -> float:
    families = text_string_to_metric_families(admin.get("/stats").body.decode())
    return sum(
        s.value
        for f in families
        if f.name == "planemesh_http_requests"
        for s in f.samples
        if s.name == "planemesh_http_requests_total" and s.labels.get("plane") == plane
    )


def test_notify_metrics_config_dump_and_admin_isolation(run_prefix: str, tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.05)
    lab = load_lab(prefix=f"{run_prefix}o")
    with lab:
        servers = start_servers(lab)
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "600000"}
        extra = ["--xds-resources", str(default_xds_resources()), "--admin", "127.0.0.1:15000"]
        agent = start_agent(lab, tmp_path, extra, env=env)
        try:
            messages: list[str] = []

            def received(text: str) -> bool:
                while True:
                    try:
                        messages.extend(notify.recv(4096).decode().split("\n"))
                    except TimeoutError:
                        break
                return text in messages

            # READY=1 came only once the data path works: a request right now is proxied.
            assert eventually(lambda: received("READY=1"), timeout=5)
            client, dst = lab.pod_ns("client"), lab.pod_addr("server", "oam", 4)
            assert "x-request-id" in http_requests(client, dst, 80, ["/"]).seen(0)["headers"]
            messages.clear()
            assert eventually(lambda: messages.count("WATCHDOG=1") >= 2 or received("never"), timeout=3)

            # /stats parses as Prometheus text and counts exactly the requests sent.
            admin = AdminClient(f"unix://{tmp_path / 'admin.sock'}")
            time.sleep(0.6)
            before = proxied_requests(admin, "oam")
            assert http_requests(client, dst, 80, ["/m"] * 37).status == [200] * 37
            assert eventually(lambda: proxied_requests(admin, "oam") - before == 37, timeout=5)

            # /config_dump is what the management server sent: its versions and its listeners.
            _, dump = admin.get_json("/config_dump")
            assert dump["version"].startswith("xds:")
            assert {"Listener", "RouteConfiguration", "Cluster"} <= {t.rsplit(".", 1)[-1] for t in dump["xds_versions"]}
            ports = {(lsn["plane"], lsn["port"], lsn["protocol"]) for lsn in dump["snapshot"]["listeners"]}
            assert {("oam", 80, "http"), ("media", 8080, "http"), ("media", 9000, "tcp")} <= ports

            # The admin endpoint listens on loopback of the node only: no pod reaches it.
            def reachable(address: str) -> bool:
                try:
                    socket.create_connection((address, 15000), timeout=1).close()
                    return True
                except OSError:
                    return False

            assert call_in(lab.node_ns, reachable, "127.0.0.1")
            for address in (lab.node_addr("oam", 4), "127.0.0.1"):
                assert not call_in(client, reachable, address)
            messages.clear()
        finally:
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0
            for proc in servers:
                ns_tools.stop(proc)
        assert received("STOPPING=1")
    notify.close()
