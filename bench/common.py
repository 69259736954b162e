"""Shared pieces of the benchmarks: a lab with nginx, wrk runs and their parsing, ratios.

Benchmarks measure, they do not assert. Every figure printed comes from a tool run in this process.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from planemesh.labs import Lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.traffic import host_port, http_requests, wait_for_port

NGINX = "/usr/sbin/nginx"


@dataclass
class WrkResult:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors + non-2xx/3xx answers
    requests: int
    non_2xx: int = 0
    timeouts: int = 0

    def row(self, base: WrkResult | None = None) -> str:
        ratio = f"{self.rps / base.rps:6.2f}x" if base and base.rps else "      -"
        return f"{self.name:34} {self.rps:10.0f} {self.p50_ms:8.3f} {self.p99_ms:8.3f} {self.errors:7d}  {ratio}"


HEADER = f"{'case':34} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}  ratio"

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(name: str, out: str) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    socket_errors = timeouts = non_2xx = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        socket_errors = sum(int(x) for x in m.groups())
        timeouts = int(m.group(4))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        non_2xx = int(m.group(1))
    return WrkResult(name, rps, p50, p99, socket_errors + non_2xx, total, non_2xx, timeouts)


def wrk(ns: str, name: str, url: str, *, threads: int = 1, connections: int = 16, seconds: int = 5) -> WrkResult:
    out = ns_tools.run(
        ns,
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        timeout=seconds + 30,
    ).stdout
    return parse_wrk(name, out)


def parse_h2load(name: str, out: str) -> WrkResult:
    """h2load's summary as a WrkResult (p50: h2load prints the mean and sd of request times, not percentiles;
    the mean is reported in the p50 column and p99 is mean + 2 sd)."""
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    done, failed = (int(m.group(1)), int(m.group(3)) + int(m.group(4))) if m else (0, 0)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    non_2xx = sum(int(codes.group(i)) for i in (3, 4)) if codes else 0
    t = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)\s+(\S+)", out)
    mean, sd = (_ms(t.group(1)), _ms(t.group(2))) if t else (float("nan"), float("nan"))
    return WrkResult(name, rps, mean, mean + 2 * sd, failed + non_2xx, done, non_2xx, 0)


def h2load(ns: str, name: str, url: str, *, connections: int = 16, streams: int = 32, seconds: int = 5) -> WrkResult:
    """h2c (prior knowledge) load from inside `ns`: `connections` connections, `streams` concurrent streams each."""
    out = ns_tools.run(
        ns, ["h2load", "-t1", f"-c{connections}", f"-m{streams}", f"-D{seconds}", url], timeout=seconds + 30
    ).stdout
    return parse_h2load(name, out)


def url(lab: Lab, plane: str, version: int, port: int, path: str = "/") -> str:
    addr = lab.pod_addr("server", plane, version)
    assert addr is not None
    return f"http://{host_port(addr, port)}{path}"


def nginx_conf(workdir: Path, listens: str) -> Path:
    """One-worker nginx serving a small static body with `listens` (listen directives); its config file."""
    root = workdir / "www"
    root.mkdir(exist_ok=True)
    (root / "index.html").write_text("planemesh bench " * 8)
    conf = workdir / "nginx.conf"
    conf.write_text(
        textwrap.dedent(f"""\
            daemon off; master_process off; worker_processes 1; pid {workdir}/nginx.pid;
            error_log {workdir}/nginx-error.log;
            events {{ worker_connections 4096; }}
            http {{
              access_log off; keepalive_requests 1000000; keepalive_timeout 120s;
              client_body_temp_path {workdir}; proxy_temp_path {workdir}; fastcgi_temp_path {workdir};
              uwsgi_temp_path {workdir}; scgi_temp_path {workdir};
              server {{ {listens} root {root}; }}
            }}
        """)
    )
    return conf


def start_nginx(lab: Lab, pod: str, ports: list[int], workdir: Path) -> subprocess.Popen:
    """nginx in a pod, one worker, a small static body on every port (dual-stack)."""
    conf = nginx_conf(workdir, "\n".join(f"listen [::]:{p} ipv6only=off backlog=4096;" for p in ports))
    proc = ns_tools.popen(lab.pod_ns(pod), [NGINX, "-c", str(conf), "-e", str(workdir / "nginx-error.log")])
    for p in ports:
        wait_for_port(lab.pod_ns("client"), lab.pod_addr(pod, "oam", 4) or "", p)
    return proc


def wait_http(ns: str, host: str, port: int, *, status: int = 200, headers: dict[str, str] | None = None,
              path: str = "/", response_header: str | None = None, timeout: float = 60.0) -> None:  # fmt: skip
    """Until a request from `ns` answers `status` (carrying `response_header` when given: proof a proxy is in
    the path, since the data path falls open to the destination when no proxy listens); raises after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = http_requests(ns, host, port, [path], headers=headers, timeout=2)
            if r.status == [status] and (response_header is None or response_header in r.headers[0]):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{host}:{port} never answered {status} within {timeout:.0f}s")
        time.sleep(0.2)


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="planemesh-bench-")
