"""The CLI imports only the module of the command asked for: `planemesh agent` does not load grpc/protobuf
(the xds-server command's imports) unless xDS is configured."""

from __future__ import annotations

import subprocess
import sys

import pytest

from planemesh.agent.cli import COMMANDS, _command_of

pytestmark = pytest.mark.unit

PROBE = """
import sys
from planemesh.agent.cli import build_parser
build_parser(argv={argv!r}).parse_args({argv!r})
print(",".join(m for m in ("grpc", "google.protobuf", "planemesh.xds.server") if m in sys.modules))
"""


def loaded(argv: list[str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_agent_command_does_not_import_grpc() -> None:
    assert loaded(["agent", "--config", "/etc/planemesh/config.yaml"]) == ""
    assert loaded(["status"]) == ""


def test_xds_server_command_still_has_its_options() -> None:
    assert "grpc" in loaded(["xds-server", "--resources", "/tmp"])


@pytest.mark.parametrize(("argv", "want"), [
    (["agent", "--config", "x"], "agent"), (["--version"], None), (["lab", "up"], None), (["top", "--once"], "top"),
    ([], None), (["nonsense"], None),
])  # fmt: skip
def test_command_of(argv: list[str], want: str | None) -> None:
    assert _command_of(argv) == want
    assert want is None or want in COMMANDS


def test_worker_proxy_does_not_import_cryptography() -> None:
    """The proxy a worker runs loads cryptography (~9 MB of RSS) only when a plane terminates or originates TLS."""
    probe = ("import sys, planemesh.agent.worker_process, planemesh.agent.proxy.server; "
             "print('cryptography' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
