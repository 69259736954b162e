"""h2load and curl (h2c prior knowledge) through the proxy: no stream lost, HTTP/1.1 upstream per stream."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.proxy.proxy_harness import Backend, ProxyThread
from tests.proxy.test_sniff_passthrough import SniffProxy

pytestmark = pytest.mark.skipif(
    shutil.which("h2load") is None or shutil.which("curl") is None, reason="h2load/curl not installed"
)


class WideBackend(Backend):
    request_queue_size = 1024  # h2load opens 200 streams at once: one upstream connection each


def test_h2load_no_stream_lost() -> None:
    with WideBackend() as backend, ProxyThread([("127.0.0.1", backend.port)]) as proxy:
        out = subprocess.run(
            ["h2load", "-n", "2000", "-c", "4", "-m", "50", f"http://127.0.0.1:{proxy.port}/load"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        done = re.search(
            r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
            r"(\d+) errored",
            out,
        )
        assert done is not None, out
        assert done.groups() == ("2000", "2000", "2000", "0", "0"), out
        assert "status codes: 2000 2xx" in out
        assert len(backend.seen) == 2000
        assert proxy.proxy.stats.requests_active == 0


def test_curl_h2_prior_knowledge_on_a_sniffed_port() -> None:
    with Backend() as backend, SniffProxy() as sniffer:
        sniffer.target = ("127.0.0.1", backend.port)
        res = subprocess.run(
            [
                "curl",
                "-sS",
                "--http2-prior-knowledge",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                "--max-time",
                "5",
                f"http://127.0.0.1:{sniffer.port}/via-h2",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert res.stdout == "2 200", res.stderr
        method, path, headers = backend.seen[-1]
        assert (method, path) == ("GET", "/via-h2") and "x-request-id" in headers
    assert sniffer.proxy.sniff_stats.kinds["h2"] == 1
