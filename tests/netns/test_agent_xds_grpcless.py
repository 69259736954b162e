"""The DaemonSet's case (issue #15): an agent on an xDS bootstrap takes its configuration over planemesh's own
gRPC client (xds/grpc_channel.py) and never loads grpcio (~8.6 MB of RSS and its threads): the management server
is grpcio's, the agent's side is not. Without certificates in its configuration (no `ca:`, no TLS Secret) it
does not load `cryptography` either (~8 MB): the first Secret loads it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from planemesh.labs.traffic import http_requests
from tests.netns.agent_lab import eventually, running_agent
from tests.netns.test_agent_xds import TEAPOT, resources, start_server, write, xds_lab_files

pytestmark = pytest.mark.netns


def mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1] for line in f if len(line.split()) >= 6}


def grpcio_files(pid: int) -> set[str]:
    """grpcio's extension module (cygrpc) or any file of the grpc package mapped into a process."""
    return {p for p in mapped_files(pid) if "cygrpc" in os.path.basename(p) or "/grpc/" in p}


def cryptography_files(pid: int) -> set[str]:
    return {p for p in mapped_files(pid) if "/cryptography/" in p}


def test_an_agent_on_an_xds_bootstrap_follows_the_server_without_grpcio(run_prefix: str, tmp_path: Path) -> None:
    res, sock, boot = xds_lab_files(tmp_path, "n")
    server = start_server(res, sock)
    try:
        with running_agent(f"{run_prefix}g", ["--bootstrap", str(boot)]) as env:
            dst = env.server("oam", 4)
            assert http_requests(env.client_ns, dst, 80, ["/"]).status == [200]
            write(res / "config.yaml", resources(TEAPOT))  # a push reaches the agent and is applied
            assert eventually(lambda: http_requests(env.client_ns, dst, 80, ["/"]).status == [418], 5, 0.05)
            _, stats = env.admin.get_json("/stats?format=json")
            assert stats["xds_connected"] and all(row["nacks"] == 0 for row in stats["xds"])
            assert grpcio_files(env.agent.pid) == set()
            assert cryptography_files(env.agent.pid) == set()
            assert grpcio_files(server.pid), "the check sees grpcio where it is loaded (the server)"
    finally:
        server.kill()
        server.wait()
