"""CONNECT through the real agent is no open proxy (issue 11, finding 5).

The management server pushes a listener on port 80 that allows CONNECT and a connect_matcher route to the
ORIGINAL_DST cluster. A client pod connects to the server pod's oam address on port 80 (the TC program steers
it to oam's proxy) and asks to CONNECT to the node's loopback-only service, to `localhost`, to the media
plane's address and to the server itself: every tunnel ends at the connection's original destination (the
server pod, port 80), never at the authority. Before the fix the first three reached the node's loopback and
the other plane.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from planemesh.labs import load_lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.envoy_resources import T, http_listener, route_config
from planemesh.labs.netns import call_in
from tests.netns.agent_lab import AgentLab, eventually, running_agent
from tests.netns.test_traffic_xds import XdsPusher
from tests.xds.xds_harness import LoopThread

pytestmark = pytest.mark.netns
LOOPBACK_PORT = 18999  # the node's 127.0.0.1-only service

# Listens on the node's loopback only and reports every connection it accepts.
_LOOPBACK_SERVICE = f"""
import socket, sys
srv = socket.create_server(("127.0.0.1", {LOOPBACK_PORT}))
print("ready", flush=True)
while True:
    conn, peer = srv.accept()
    print("accepted", peer, flush=True)
    conn.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-length: 8\\r\\nconnection: close\\r\\n\\r\\nloopback")
    conn.close()
"""


def connect_listener() -> dict:
    doc = http_listener(routes="tunnels")
    hcm = doc["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["upgrade_configs"] = [{"upgrade_type": "CONNECT"}]
    return doc


def tunnel_routes() -> dict:
    connect_route = {"match": {"connect_matcher": {}},
                     "route": {"cluster": "passthrough",
                               "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}}  # fmt: skip
    return route_config([connect_route, {"match": {"prefix": "/"}, "route": {"cluster": "passthrough"}}],
                        name="tunnels")


def passthrough_cluster() -> dict:
    return {"@type": T + "envoy.config.cluster.v3.Cluster", "name": "passthrough", "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s"}  # fmt: skip


def _connect_then_get(address: str, port: int, authority: str) -> tuple[str, bytes]:
    """Runs in the client pod: CONNECT, then an HTTP request inside the tunnel; (status line, what came back)."""
    with socket.create_connection((address, port), timeout=10) as s:
        s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = s.recv(65536)
            if not data:
                break
            head += data
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        if " 200 " not in status_line + " ":
            return status_line, head
        s.sendall(b"GET /through-the-tunnel HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        out = bytearray(head.partition(b"\r\n\r\n")[2])
        while data := s.recv(65536):
            out += data
        return status_line, bytes(out)


@pytest.fixture(scope="module")
def lab(run_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentLab, str, Any]]:
    tmp: Path = tmp_path_factory.mktemp("connect-lab")
    prefix = f"{run_prefix}c"
    host = load_lab(prefix=prefix).pod_addr("server", "oam", 4)
    assert host is not None
    loop = LoopThread()
    xds = None
    try:
        xds = XdsPusher(loop, tmp / "xds.sock")
        boot = xds.write_bootstrap(tmp / "bootstrap.yaml", {"id": "connect-lab"})
        docs = [connect_listener(), tunnel_routes(), passthrough_cluster()]
        xds.push(docs, wait=False)  # before the agent exists: its first fetch finds a complete set
        with running_agent(prefix, ["--bootstrap", str(boot)]) as env:
            loopback = ns_tools.start_until(env.lab.node_ns, [sys.executable, "-c", _LOOPBACK_SERVICE], "ready")
            try:
                def ready() -> bool:
                    try:
                        status_line, _ = call_in(env.client_ns, _connect_then_get, host, 80, f"{host}:80")
                    except OSError:
                        return False
                    return status_line.endswith(" 200 Connection established")

                assert eventually(ready, timeout=15), "the agent never served CONNECT"
                yield env, host, loopback
            finally:
                ns_tools.stop(loopback)
    finally:
        if xds is not None:
            loop.run(xds.server.stop())
        loop.close()


def test_connect_tunnels_only_to_the_original_destination(lab: tuple[AgentLab, str, Any]) -> None:
    env, host, loopback = lab
    media = env.server("media", 4)
    for authority in (f"127.0.0.1:{LOOPBACK_PORT}", f"localhost:{LOOPBACK_PORT}", f"{media}:80", f"{host}:80"):
        status_line, answer = call_in(env.client_ns, _connect_then_get, host, 80, authority)
        assert status_line == "HTTP/1.1 200 Connection established", (authority, status_line, answer)
        assert b"loopback" not in answer, authority
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), (authority, answer)
        seen = json.loads(body)
        # The server pod answered, reached at the address and port the client's packet was sent to.
        assert (seen["local"], seen["port"], seen["path"]) == (host, 80, "/through-the-tunnel"), (authority, seen)
    assert not any("accepted" in line for line in loopback.output_lines), loopback.output_lines
