"""h2 clients through the proxy to a real nginx on loopback: an `http2` cluster to nginx's h2c (`listen ... http2`
without TLS: prior knowledge) and an HTTP/1.1 cluster to nginx's plain port, whose access log shows the pooled
upstream connections (`$connection`, `$remote_port`)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from planemesh.model.config import Cluster
from tests.proxy.proxy_harness import ProxyThread, free_port
from tests.proxy.test_h2_pool import H2Client
from tests.support.clusters import endpoint, static_cluster

NGINX = "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(
    not Path(NGINX).exists() or shutil.which("h2load") is None, reason="nginx/h2load not installed"
)
BIG = hashlib.sha256(b"big").digest() * (4 * 1024 * 1024 // 32)  # 4 MiB: above every flow-control window


@dataclass
class Nginx:
    h2c_port: int
    h1_port: int
    h2c_short_port: int  # h2c, a GOAWAY after every 100 streams (keepalive_requests)
    log: Path

    def log_lines(self) -> list[str]:
        deadline = time.monotonic() + 2  # nginx writes its access log line after the response
        lines = self.log.read_text().splitlines()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            again = self.log.read_text().splitlines()
            if again == lines:
                break
            lines = again
        return lines


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    work = tmp_path_factory.mktemp("nginx")
    (work / "www" / "up").mkdir(parents=True)
    (work / "www" / "index.html").write_text("hello from nginx\n")
    (work / "www" / "big.bin").write_bytes(BIG)
    h2c, h1, h2c_short = free_port(), free_port(), free_port()
    log = work / "access.log"
    conf = work / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        daemon off; master_process off; worker_processes 1; pid {work}/nginx.pid;
        error_log {work}/error.log;
        events {{ worker_connections 1024; }}
        http {{
          log_format conns '$connection $remote_port $server_port $request_method $request_uri $status';
          access_log {log} conns; keepalive_requests 100000;
          client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
          uwsgi_temp_path {work}; scgi_temp_path {work}; client_max_body_size 16m;
          server {{
            listen 127.0.0.1:{h2c} http2; listen 127.0.0.1:{h1};
            root {work}/www;
            location /up/ {{ dav_methods PUT; }}
          }}
          server {{ listen 127.0.0.1:{h2c_short} http2; keepalive_requests 100; root {work}/www; }}
        }}
    """))  # fmt: skip
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-e", str(work / "error.log")])
    try:
        deadline = time.monotonic() + 10
        while not log.exists() or subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{h1}/"],
                                                 check=False).returncode:  # fmt: skip
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"nginx did not start: {(work / 'error.log').read_text()}")
            time.sleep(0.05)
        yield Nginx(h2c, h1, h2c_short, log)
    finally:
        proc.terminate()
        proc.wait(10)


def _cluster(port: int, http2: bool) -> dict[str, Cluster]:
    return {"backend": static_cluster("backend", [endpoint(port)], http2=http2)}


def _h2load(port: int, path: str, n: int = 2000) -> str:
    out = subprocess.run(
        ["h2load", "-n", str(n), "-c", "4", "-m", "50", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored", out)  # fmt: skip
    assert done is not None, out
    assert done.groups() == (str(n), str(n), str(n), "0", "0"), out
    return out


def _since(nginx: Nginx, before: int, port: int) -> list[list[str]]:
    return [line.split() for line in nginx.log_lines()[before:] if line.split()[2] == str(port)]


def test_h2c_upstream_to_nginx(nginx: Nginx) -> None:
    """The `upstream reset` (502) is gone: GET (END_STREAM on the headers), HEAD, 404, a 4 MiB body down and up."""
    with ProxyThread([("127.0.0.1", nginx.h2c_port)], clusters=_cluster(nginx.h2c_port, True)) as proxy, \
            H2Client(proxy.port) as client:  # fmt: skip
        r = client.get("/")
        assert (r["status"], r["body"], r["reset"]) == (200, b"hello from nginx\n", None)
        assert client.get("/", method="HEAD")["body"] == b""
        assert client.get("/missing")["status"] == 404
        big = client.get("/big.bin")
        assert big["status"] == 200 and hashlib.sha256(big["body"]).digest() == hashlib.sha256(BIG).digest()
    body = BIG[: 3 << 20]
    with ProxyThread([("127.0.0.1", nginx.h2c_port)], clusters=_cluster(nginx.h2c_port, True)) as proxy:
        res = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-T", "-", "-o", "/dev/null",
                              "-w", "%{http_code}", f"http://127.0.0.1:{proxy.port}/up/put.bin"],
                             input=body, capture_output=True, timeout=20)  # fmt: skip
        assert res.stdout in (b"201", b"204"), res.stderr
        with H2Client(proxy.port) as client:
            back = client.get("/up/put.bin")
        assert hashlib.sha256(back["body"]).digest() == hashlib.sha256(body).digest()
        lines = proxy.flush_log()
    assert all(" 502 " not in line for line in lines)
    assert all(f'"127.0.0.1:{nginx.h2c_port}" oam' in line for line in lines), lines
    assert sum("HTTP/2" in line for line in lines) == 2
    assert proxy.proxy.stats.upstream_total == 1  # the PUT's stream and the GET's on one h2c connection


def test_h2load_over_h2c_to_nginx(nginx: Nginx) -> None:
    before = len(nginx.log_lines())
    with ProxyThread([("127.0.0.1", nginx.h2c_port)], clusters=_cluster(nginx.h2c_port, True)) as proxy:
        out = _h2load(proxy.port, "/")
        assert "status codes: 2000 2xx" in out
        assert proxy.proxy.stats.requests_active == 0
    seen = _since(nginx, before, nginx.h2c_port)
    assert len(seen) == 2000
    assert len({conn for conn, *_ in seen}) <= 2  # multiplexed: 200 streams at once fit under nginx's 128 twice


def test_streams_survive_nginx_goaway_every_100_streams(nginx: Nginx) -> None:
    """nginx sends GOAWAY after keepalive_requests streams and still answers the streams up to its last stream
    id (h2 alone would drop them: 502); the ones above it are opened again on a new connection (503 before)."""
    port = nginx.h2c_short_port
    before = len(nginx.log_lines())
    with ProxyThread([("127.0.0.1", port)], clusters=_cluster(port, True)) as proxy:
        out = _h2load(proxy.port, "/")
        assert "status codes: 2000 2xx" in out
        assert proxy.proxy.stats.upstream_total >= 20  # 100 streams per connection
        assert proxy.proxy.stats.requests_active == 0
        lines = proxy.flush_log()
    assert sum('" 200 - ' in line for line in lines) == 2000, [line for line in lines if '" 200 - ' not in line][:3]
    seen = _since(nginx, before, port)
    assert len(seen) == 2000  # each request reached nginx exactly once


def test_h2load_over_pooled_http1_to_nginx(nginx: Nginx) -> None:
    before = len(nginx.log_lines())
    with ProxyThread([("127.0.0.1", nginx.h1_port)], clusters=_cluster(nginx.h1_port, False)) as proxy:
        out = _h2load(proxy.port, "/")
        assert "status codes: 2000 2xx" in out
        total = proxy.proxy.stats.upstream_total
    seen = _since(nginx, before, nginx.h1_port)
    assert len(seen) == 2000
    conns = {conn for conn, *_ in seen}
    assert len(conns) == total <= 200  # at most one connection per concurrent stream (4 x 50), each reused
    assert len({port for _, port, *_ in seen}) == len(conns)
