"""The agent driven by xDS in a real lab: routes change live, bad config is NACKed, losing the server is harmless."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from planemesh.labs.traffic import http_requests
from planemesh.model.static_config import default_config_text
from tests.netns.agent_lab import eventually, running_agent

pytestmark = pytest.mark.netns

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def resources(root_route: dict) -> list[dict]:
    return [
        {
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "http",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 80}},
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": HCM,
                                "stat_prefix": "http",
                                "rds": {"route_config_name": "routes", "config_source": {"ads": {}}},
                                "http_filters": [
                                    {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
                                ],
                            },
                        }
                    ]
                }
            ],
        },
        {
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "name": "routes",
            "virtual_hosts": [
                {
                    "name": "any",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/slow/"}, "route": {"cluster": "passthrough", "timeout": "10s"}},
                        {"match": {"prefix": "/"}, **root_route},
                    ],
                }
            ],
        },
        {
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": "passthrough",
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "2s",
        },
    ]


PASSTHROUGH = {"route": {"cluster": "passthrough"}}
TEAPOT = {"direct_response": {"status": 418, "body": {"inline_string": "routed by the new config"}}}
BROKEN = {"direct_response": {"status": 1000}}  # not an HTTP status: the route configuration is NACKed
GHOST = {"route": {"cluster": "no-such-cluster"}}  # valid (Envoy): answered 503 NC until the cluster exists


def write(path: Path, items: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(items))
    tmp.rename(path)  # atomic: the server never reads half a file


def start_server(resource_dir: Path, sock: Path):
    argv = [sys.executable, "-m", "planemesh.agent.cli", "xds-server", "--resources", str(resource_dir),
            "--listen", f"unix://{sock}"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert eventually(sock.exists, timeout=15), "xds-server did not start"
    return proc


def xds_lab_files(tmp_path: Path, node_id: str) -> tuple[Path, Path, Path]:
    """(resource dir with the PASSTHROUGH resources, the server's socket, a bootstrap on it with the default
    planes and a quick reconnect) in tmp_path."""
    res = tmp_path / "resources"
    res.mkdir()
    write(res / "config.yaml", resources(PASSTHROUGH))
    sock = tmp_path / "xds.sock"
    boot = tmp_path / "bootstrap.yaml"
    planes = yaml.safe_load(default_config_text())["planes"]
    timing = {"backoff_base_s": 0.1, "backoff_max_s": 0.5}
    boot.write_text(yaml.safe_dump({"node": {"id": node_id}, "server": {"address": f"unix://{sock}"},
                                    "timing": timing, "planes": planes}))  # fmt: skip
    return res, sock, boot


def test_agent_follows_xds_keeps_last_good_config_and_survives_server_loss(run_prefix: str, tmp_path: Path) -> None:
    res, sock, boot = xds_lab_files(tmp_path, "lab-node")
    server = start_server(res, sock)
    try:
        with running_agent(f"{run_prefix}x", ["--bootstrap", str(boot)]) as env:
            dst = env.server("oam", 4)
            first = http_requests(env.client_ns, dst, 80, ["/"])
            assert first.status == [200] and "x-request-id" in first.seen(0)["headers"]

            # A long request in flight on the old config...
            slow: dict = {}
            t = threading.Thread(
                target=lambda: slow.update(r=http_requests(env.client_ns, dst, 80, ["/slow/delay/1500"]))
            )
            t.start()
            time.sleep(0.2)
            # ...while the route changes: the agent routes by the new file within a second.
            changed_at = time.monotonic()
            write(res / "config.yaml", resources(TEAPOT))
            assert eventually(lambda: http_requests(env.client_ns, dst, 80, ["/"]).status == [418], 5, 0.02)
            switch_s = time.monotonic() - changed_at
            t.join(10)
            assert slow["r"].status == [200], "the request in flight finished on the config it started with"
            assert switch_s < 2.0, f"route change took {switch_s:.2f}s"
            print(f"route change active after {switch_s * 1000:.0f} ms")

            # A broken update is NACKed by the agent; the last good config keeps serving.
            write(res / "config.yaml", resources(BROKEN))

            def nacked() -> bool:
                _, stats = env.admin.get_json("/stats?format=json")
                return any(row["nacks"] > 0 for row in stats["xds"])

            assert eventually(nacked, timeout=5)
            assert http_requests(env.client_ns, dst, 80, ["/"]).status == [418]
            # A route naming a cluster that does not exist is not an error: it answers 503 (flag NC).
            write(res / "config.yaml", resources(GHOST))
            assert eventually(lambda: http_requests(env.client_ns, dst, 80, ["/"]).status == [503], 5, 0.05)
            write(res / "config.yaml", resources(TEAPOT))
            assert eventually(lambda: http_requests(env.client_ns, dst, 80, ["/"]).status == [418], 5, 0.05)

            # Losing the server: traffic keeps flowing on the current config.
            server.terminate()
            server.wait(10)
            time.sleep(0.5)
            assert http_requests(env.client_ns, env.server("media", 6), 80, ["/"]).status == [418]
            # The server comes back with a new config: the agent reconnects and resyncs.
            write(res / "config.yaml", resources(PASSTHROUGH))
            sock.unlink(missing_ok=True)
            server = start_server(res, sock)
            assert eventually(lambda: http_requests(env.client_ns, dst, 80, ["/"]).status == [200], 10, 0.1)
            assert env.agent.poll() is None
    finally:
        server.kill()
        server.wait()
