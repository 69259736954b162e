"""`planemesh top` against a real agent in a lab: one frame per plane, with the traffic sent meanwhile."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from planemesh.labs.traffic import http_requests
from tests.netns.agent_lab import running_agent

pytestmark = pytest.mark.netns


def test_top_shows_each_plane_and_live_request_rates(run_prefix: str) -> None:
    with running_agent(f"{run_prefix}t") as env:
        stop = threading.Event()
        sent = []

        def traffic() -> None:
            while not stop.is_set():
                sent.append(http_requests(env.client_ns, env.server("oam", 4), 80, ["/"] * 20).status.count(200))

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            time.sleep(0.5)
            top = subprocess.run(
                [sys.executable, "-m", "planemesh.agent.cli", "top", "--iterations", "3",
                 "--admin", f"unix://{env.workdir / 'admin.sock'}"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        finally:
            stop.set()
            thread.join(30)
        print(top.stdout)
        assert top.returncode == 0, top.stderr
        frames = top.stdout.split("planemesh top - ")[1:]
        assert len(frames) == 3 and sum(sent) > 0
        for frame in frames:
            assert " ready " in frame.splitlines()[0]
            planes = {line.split()[0] for line in frame.splitlines() if line[:1].isalpha()}
            assert {"oam", "media"} <= planes, frame
        oam_rates = [float(line.split()[1]) for f in frames for line in f.splitlines() if line.startswith("oam ")]
        assert max(oam_rates) > 0, top.stdout

        once = subprocess.run(
            [sys.executable, "-m", "planemesh.agent.cli", "top", "--once", "--interval", "0.2",
             "--admin", f"unix://{env.workdir / 'admin.sock'}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert once.returncode == 0 and once.stdout.count("planemesh top - ") == 1, once.stderr
