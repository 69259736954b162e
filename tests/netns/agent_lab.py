"""A running agent in a real lab, for end-to-end tests: lab up, lab servers, agent, admin client."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from planemesh.agent.admin_client import AdminClient
from planemesh.agent.demo import start_agent, start_servers
from planemesh.agent.identity.ca import key_pem, new_root, utcnow
from planemesh.agent.identity.ca_files import write_root_ca
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.labs import Lab, load_lab
from planemesh.labs import netns as ns_tools
from tests.support.waiting import eventually


@dataclass
class AgentLab:
    lab: Lab
    workdir: Path
    agent: subprocess.Popen
    servers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def admin(self) -> AdminClient:
        return AdminClient(f"unix://{self.workdir / 'admin.sock'}")

    @property
    def client_ns(self) -> str:
        return self.lab.pod_ns("client")

    def server(self, plane: str, version: int) -> str:
        addr = self.lab.pod_addr("server", plane, version)
        assert addr is not None
        return addr

    def client(self, plane: str, version: int) -> str:
        addr = self.lab.pod_addr("client", plane, version)
        assert addr is not None
        return addr

    def planes(self) -> dict[str, dict[str, Any]]:
        _, body = self.admin.get_json("/planes")
        return {view["name"]: view for view in body["planes"]}

    def access_log(self) -> str:
        path = self.workdir / "access.log"
        return path.read_text() if path.exists() else ""

    def agent_output(self) -> str:
        return "\n".join(getattr(self.agent, "output_lines", []))


@contextlib.contextmanager
def running_agent(prefix: str, extra_args: list[str] | None = None, lab_file: str | None = None) -> Iterator[AgentLab]:
    lab = load_lab(lab_file, prefix=prefix)
    with tempfile.TemporaryDirectory(prefix="planemesh-test-") as tmp, lab:
        servers = start_servers(lab)
        agent = None
        try:
            agent = start_agent(lab, Path(tmp), extra_args)
            yield AgentLab(lab, Path(tmp), agent, servers)
        finally:
            if agent is not None:
                ns_tools.stop(agent)
            for proc in servers:
                ns_tools.stop(proc)


@contextlib.contextmanager
def ca_xds_server(workdir: Path, resources: list[dict[str, Any]]) -> Iterator[tuple[Path, Any]]:
    """`planemesh xds-server --ca` (a new root CA issuing `default`/`ROOTCA` over SDS) serving `resources` on a unix
    socket under `workdir`: yields (the socket's path, the root CA), killed on exit."""
    root = new_root("cluster.local", now=utcnow())
    write_root_ca(workdir / "ca", root)
    (workdir / "resources").mkdir()
    (workdir / "resources" / "resources.yaml").write_text(yaml.safe_dump(resources))
    sock = workdir / "xds.sock"
    server = subprocess.Popen(
        [sys.executable, "-m", "planemesh.agent.cli", "xds-server", "--resources", str(workdir / "resources"),
         "--listen", f"unix://{sock}", "--ca", str(workdir / "ca")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert eventually(sock.exists, timeout=15), "xds-server did not start"
        yield sock, root
    finally:
        server.kill()
        server.wait()


def write_client_certs(certs: Path, clients: dict[str, tuple[Any, str]]) -> Path:
    """name -> (CA, SPIFFE ID): certs/<name>.pem and .key, issued now. Returns `certs`."""
    certs.mkdir(exist_ok=True)
    for name, (ca, who) in clients.items():
        issued = ca.issue(parse_spiffe_id(str(who)), now=utcnow())
        (certs / f"{name}.pem").write_bytes(issued.cert_chain_pem())
        (certs / f"{name}.key").write_bytes(key_pem(issued.key))
    return certs
