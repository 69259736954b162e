"""A running agent in a real lab, for end-to-end tests: lab up, lab servers, agent, admin client."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planemesh.agent.admin_client import AdminClient
from planemesh.agent.demo import start_agent, start_servers
from planemesh.labs import Lab, load_lab
from planemesh.labs import netns as ns_tools
from tests.support.waiting import eventually  # noqa: F401  (re-exported: tests import it from here)


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
