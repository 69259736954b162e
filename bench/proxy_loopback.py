"""nginx on loopback, direct vs through planemesh's proxy, measured with wrk.

    .venv/bin/python bench/proxy_loopback.py [--duration 5] [--connections 16] [--profile out.prof]
    .venv/bin/python -m bench proxy_loopback --h2 [--streams 32]    # h2load, h2c prior knowledge, to the proxy

nginx: a throw-away config in a temp dir (daemon off, worker_processes 1, 127.0.0.1, small body).
The proxy runs in its own process (uvloop, one core) with a STATIC cluster pointing at nginx.
Everything binds to 127.0.0.1 and is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.net import free_port
from tests.support.procs import dev_module_argv
from tests.support.waiting import wait_port

NGINX = "/usr/sbin/nginx"
BODY = b"hello from nginx, a small body for the proxy benchmark\n"


def start_nginx(workdir: Path, port: int) -> subprocess.Popen:
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        default_type text/plain;
        location / {{ return 200 "{BODY.decode().strip()}\\n"; }}
    }}
}}
""")
    proc = subprocess.Popen(
        [NGINX, "-c", str(conf), "-p", str(workdir), "-e", str(workdir / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc


def wrk(port: int, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return float(m.group(1)) * scale

    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99"), "non2xx": float(errors.group(1)) if errors else 0}


def h2load(port: int, duration: int, connections: int, streams: int) -> dict[str, float]:
    """h2c (prior knowledge) load: `connections` connections with `streams` concurrent streams each."""
    out = subprocess.run(
        ["h2load", "-t1", f"-c{connections}", f"-m{streams}", f"-D{duration}", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    non2xx = sum(int(m.group(i)) for i in (2, 3, 4)) if m else float("nan")
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    p50 = float(mean.group(1)) * scale[mean.group(2)] if mean else float("nan")
    return {"rps": rps, "p50_ms": p50, "p99_ms": float("nan"), "non2xx": non2xx}


def serve_proxy(proxy_port: int, upstream_port: int, profile: str | None, cpu: int | None) -> None:
    """Child process: run the proxy until SIGTERM."""
    import uvloop

    from planemesh.agent.proxy.server import PlaneProxy
    from planemesh.agent.proxy.sockets import make_listener_socket
    from tests.proxy.proxy_harness import PLANE, make_snapshot

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    snap = make_snapshot(proxy_port, [("127.0.0.1", upstream_port)])
    log_path = os.environ.get("PM_BENCH_ACCESS_LOG", os.devnull)
    from planemesh.agent.proxy.accesslog import file_sink

    proxy = PlaneProxy(snap, PLANE, access_log=file_sink(log_path))
    sock = make_listener_socket(proxy_port, transparent=False, host="127.0.0.1")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(proxy.drain(0.5)))
        await proxy.serve(sock)

    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            uvloop.run(main())
        finally:
            prof.disable()
            prof.dump_stats(profile)
    else:
        uvloop.run(main())
    print(f"stats: {proxy.stats.as_dict()}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--profile", help="write a cProfile of the proxy process here")
    ap.add_argument("--proxy-cpu", type=int, default=None, help="pin the proxy process to this CPU")
    ap.add_argument("--h2", action="store_true", help="h2load (h2c) to the proxy instead of wrk (HTTP/1.1)")
    ap.add_argument("--streams", type=int, default=32, help="h2: concurrent streams per connection (-m)")
    ap.add_argument("--serve", nargs=2, type=int, metavar=("PROXY_PORT", "UPSTREAM_PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_proxy(args.serve[0], args.serve[1], args.profile, args.proxy_cpu)
        return 0
    nginx = proxy = None
    with tempfile.TemporaryDirectory(prefix="pm-bench-") as tmp:
        try:
            nginx_port, proxy_port = free_port(), free_port()
            nginx = start_nginx(Path(tmp), nginx_port)
            cmd = dev_module_argv("bench.proxy_loopback", "--serve", str(proxy_port), str(nginx_port))
            if args.profile:
                cmd += ["--profile", args.profile]
            if args.proxy_cpu is not None:
                cmd += ["--proxy-cpu", str(args.proxy_cpu)]
            proxy = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])  # the repo: bench, tests
            wait_port(proxy_port)
            wrk(nginx_port, 1, args.connections)  # warm-up
            direct = wrk(nginx_port, args.duration, args.connections)
            if args.h2:  # nginx here speaks HTTP/1.1 only: the proxy's h2 downstream, HTTP/1.1 upstream
                h2load(proxy_port, 1, args.connections, args.streams)
                proxied = h2load(proxy_port, args.duration, args.connections, args.streams)
            else:
                wrk(proxy_port, 1, args.connections)
                proxied = wrk(proxy_port, args.duration, args.connections)
        finally:
            for proc in (proxy, nginx):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    kind = "h2c; its p50 column is the mean" if args.h2 else "HTTP/1.1"
    print(f"{'':>8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}   (proxy: {kind})")
    for name, r in (("direct", direct), ("proxy", proxied)):
        print(f"{name:>8} {r['rps']:>10.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['non2xx']:>8.0f}")
    print(
        f"ratio proxy/direct: {proxied['rps'] / direct['rps']:.3f}; vs Envoy 1.40 one worker (33k): "
        f"{proxied['rps'] / 33000:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
