"""Helpers for the xDS I/O tests: a background event loop, free loopback ports, bounded waits, Envoy."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import yaml

from tests.support.net import free_port
from tests.support.waiting import wait_for

ENVOY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "envoy"


class LoopThread:
    """One asyncio loop in a thread: the management server and our client live there during a module."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="xds-test-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def write_resources(directory: Path, name: str, docs: list[dict]) -> None:
    """Write atomically (rename), so the server's poller never reads half a file."""
    tmp = directory / f".{name}.tmp"
    tmp.write_text(yaml.safe_dump(docs))
    os.replace(tmp, directory / name)


class Envoy:
    """A real Envoy on loopback, bootstrapped to fetch everything over ADS from `xds_port`."""

    def __init__(
        self, workdir: Path, xds_port: int, node_id: str, delta: bool, *, istio_agent: bool = False
    ) -> None:
        """`istio_agent`: LDS/CDS without an initial fetch timeout, as istio-agent's bootstrap has them
        (Envoy then stays PRE_INITIALIZING until the server answers both); the constructor then does not
        wait for readiness (see `state()`)."""
        self.admin_port = free_port()
        self.node_id = node_id
        xds_cluster = {
            "name": "xds_cluster",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": "xds_cluster",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}
                                }
                            }
                        ]
                    }
                ],
            },
        }
        ads: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}
        if istio_agent:
            ads["initial_fetch_timeout"] = "0s"
        bootstrap = {
            "node": {"id": node_id, "cluster": "interop"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin_port}}},
            "static_resources": {"clusters": [xds_cluster]},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": "DELTA_GRPC" if delta else "GRPC",
                    "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
                },
                "lds_config": ads,
                "cds_config": ads,
            },
        }
        self.config = workdir / f"envoy-{node_id}.yaml"
        self.config.write_text(yaml.safe_dump(bootstrap))
        self.log = workdir / f"envoy-{node_id}.log"
        base_id = 1000 + (os.getpid() * 7 + xds_port) % 50000
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    str(ENVOY),
                    "-c",
                    str(self.config),
                    "--base-id",
                    str(base_id),
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "-l",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._admin if istio_agent else self._ready, 15, f"envoy {node_id} admin")

    def _admin(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"envoy exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            return bool(self.state())
        except OSError:
            return False

    def state(self) -> str:
        """Envoy's server state: PRE_INITIALIZING, INITIALIZING, LIVE..."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/server_info", timeout=1) as r:
            return json.load(r)["state"]

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"envoy exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def config_dump(self) -> dict[str, dict]:
        """Dynamic resources by kind -> {name: version_info}: listeners, clusters, routes, endpoints."""
        url = f"http://127.0.0.1:{self.admin_port}/config_dump?include_eds"
        with urllib.request.urlopen(url, timeout=2) as r:
            dump = json.load(r)
        out: dict[str, dict] = {"listeners": {}, "clusters": {}, "routes": {}, "endpoints": {}}
        for cfg in dump["configs"]:
            for item in cfg.get("dynamic_listeners", []):
                if "active_state" in item:
                    out["listeners"][item["name"]] = item["active_state"].get("version_info")
            for item in cfg.get("dynamic_active_clusters", []):
                out["clusters"][item["cluster"]["name"]] = item.get("version_info")
            for item in cfg.get("dynamic_route_configs", []):
                out["routes"][item["route_config"]["name"]] = item.get("version_info")
            for item in cfg.get("dynamic_endpoint_configs", []):
                out["endpoints"][item["endpoint_config"]["cluster_name"]] = item.get("version_info")
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
