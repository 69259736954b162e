"""The lab builds real namespaces, connects pods over every plane (v4 and v6) and leaves nothing behind."""

import subprocess
import sys
import time

import pytest

from planemesh.labs import load_lab
from planemesh.labs import netns as ns_tools

pytestmark = pytest.mark.netns


def _host_state() -> tuple[str, str, str]:
    ip = lambda *a: subprocess.run(["ip", *a], capture_output=True, text=True, check=True).stdout  # noqa: E731
    return ip("link", "show"), ip("-4", "rule", "show") + ip("-6", "rule", "show"), ip("route", "show", "table", "all")


def test_lab_up_connects_every_plane_and_down_leaves_nothing(run_prefix):
    before = _host_state()
    lab = load_lab(prefix=f"{run_prefix}l")
    with lab:
        assert lab.status()["up"]
        server = ns_tools.popen(
            lab.pod_ns("server"),
            [
                sys.executable,
                "-c",
                "import socket,sys\n"
                "s=socket.create_server(('::',7001),family=socket.AF_INET6,dualstack_ipv6=True)\n"
                "while True:\n c,a=s.accept(); c.sendall(a[0].encode()); c.close()",
            ],
        )
        try:
            for version in (4, 6):
                for plane in ("oam", "media"):
                    dst = lab.pod_addr("server", plane, version)
                    code = (
                        "import socket,sys,time\n"
                        "for _ in range(50):\n"
                        "  try: c=socket.create_connection((sys.argv[1],7001),timeout=2); break\n"
                        "  except OSError: time.sleep(0.05)\n"
                        "print(c.recv(100).decode())"
                    )
                    out = ns_tools.run(lab.pod_ns("client"), [sys.executable, "-c", code, dst]).stdout.strip()
                    # The server sees the client's own address on the same plane: routed, not NATed.
                    assert out.removeprefix("::ffff:") == lab.pod_addr("client", plane, version)
        finally:
            server.kill()
            server.wait()
        assert ns_tools.pids_in(lab.pod_ns("server")) == []
    assert lab.existing() == []
    assert _host_state() == before


def test_down_removes_leftovers_of_a_crashed_run(run_prefix):
    lab = load_lab(prefix=f"{run_prefix}c")
    lab.up()
    sleeper = ns_tools.popen(lab.node_ns, ["sleep", "60"])
    # A second Lab object (a new process after a crash) knows nothing but the names.
    again = load_lab(prefix=f"{run_prefix}c")
    removed = again.down()
    assert sorted(removed) == sorted(lab.namespaces())
    deadline = time.monotonic() + 5
    while sleeper.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sleeper.poll() is not None
    assert again.existing() == []
