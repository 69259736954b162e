"""TLS termination on loopback: planemesh (uvloop's TLS transport vs asyncio's SSLProtocol) vs Envoy 1.40.

    .venv/bin/python -m bench.tls [--duration 5] [--connections 16]

Each server terminates TLS (ECDSA P-256 certificates from planemesh's built-in CA) and proxies to nginx,
one process / one worker (Envoy --concurrency 1). Measured:
  - req/s and p50/p99 on reused connections: wrk over TLS (server authentication only: wrk sends no client
    certificate), 16 connections;
  - new mTLS handshakes per second: `openssl s_time -new` with a client certificate (each connection one full
    handshake, then closed; no request: Envoy holds an HTTP/1.0 GET's connection open, which would measure that).
Everything binds to 127.0.0.1 and is stopped in `finally`. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import yaml

from bench.proxy_loopback import free_port, start_nginx, wait_port
from tests.support.procs import dev_module_argv

ENVOY = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "envoy"
T = "type.googleapis.com/"


def write_certs(d: Path) -> None:
    from planemesh.agent.identity.ca import key_pem, new_root, utcnow
    from planemesh.agent.identity.spiffe import parse_spiffe_id

    root = new_root("cluster.local", now=utcnow())
    (d / "root.pem").write_bytes(root.root_pem())
    for name, sa in (("server", "gw"), ("client", "amf")):
        issued = root.issue(parse_spiffe_id(f"spiffe://cluster.local/ns/ran/sa/{sa}"), now=utcnow())
        (d / f"{name}.pem").write_bytes(issued.cert_chain_pem())
        (d / f"{name}.key").write_bytes(key_pem(issued.key))


def serve_planemesh(port: int, upstream: int, certs: Path, loop_kind: str, mtls: bool, tickets: bool = True) -> None:
    """Child process: planemesh's proxy terminating TLS on `port` until SIGTERM."""
    from planemesh.agent.proxy.server import PlaneProxy
    from planemesh.agent.proxy.sockets import make_listener_socket
    from planemesh.model.tls_config import CertSecret, TlsContext, TrustSecret
    from tests.proxy.proxy_harness import PLANE, make_snapshot

    base = make_snapshot(port, [("127.0.0.1", upstream)])
    tls = TlsContext(cert="default", trust="ROOTCA", require_client_cert=mtls, alpn=("http/1.1",),
                     session_tickets=tickets)  # fmt: skip
    secrets = {
        "default": CertSecret((certs / "server.pem").read_bytes(), (certs / "server.key").read_bytes()),
        "ROOTCA": TrustSecret((certs / "root.pem").read_bytes()),
    }
    snap = replace(base, listeners=(replace(base.listeners[0], tls=tls),), secrets=MappingProxyType(secrets))
    proxy = PlaneProxy(snap, PLANE)
    sock = make_listener_socket(port, transparent=False, host="127.0.0.1")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(proxy.drain(0.5)))
        await proxy.serve(sock)

    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
    print(f"tls: {proxy.tls_stats.as_dict()}", file=sys.stderr)


def envoy_config(port: int, upstream: int, certs: Path, mtls: bool, admin: int, tickets: bool = True) -> dict:
    def inline(name: str) -> dict:
        return {"inline_bytes": base64.b64encode((certs / name).read_bytes()).decode()}

    common = {
        "tls_certificates": [{"certificate_chain": inline("server.pem"), "private_key": inline("server.key")}],
        "validation_context": {"trusted_ca": inline("root.pem")},
        "alpn_protocols": ["http/1.1"],
    }
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "b",
        "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "nginx"}}]}]},
        "http_filters": [{"name": "r", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}],
    }  # fmt: skip
    listener = {
        "name": "tls",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{
            "transport_socket": {"name": "tls", "typed_config": {
                "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": mtls, "common_tls_context": common,
                "disable_stateless_session_resumption": not tickets}},
            "filters": [{"name": "hcm", "typed_config": hcm}]}],
    }  # fmt: skip
    cluster = {
        "name": "nginx", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "nginx", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]},
    }  # fmt: skip
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
    }


def wrk_tls(port: int, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", f"https://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=duration + 30, check=True).stdout  # fmt: skip

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else float("nan")

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p50": pct("50"), "p99": pct("99")}


def handshakes(port: int, certs: Path, seconds: int, mode: str = "-new") -> float:
    """mTLS handshakes/s: `-new` full handshakes, `-reuse` resumed ones (the session of the first connection)."""
    out = subprocess.run(
        ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", mode, "-time", str(seconds),
         "-cert", certs / "client.pem", "-key", certs / "client.key", "-CAfile", certs / "root.pem"],
        capture_output=True, text=True, timeout=seconds + 30, check=False).stdout  # fmt: skip
    m = re.search(r"(\d+) connections in ([\d.]+) real seconds", out)
    return int(m.group(1)) / float(m.group(2)) if m else float("nan")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_server(
    kind: str, port: int, upstream: int, certs: Path, mtls: bool, workdir: Path, tickets: bool = True
) -> subprocess.Popen:
    if kind == "envoy":
        cfg = workdir / f"envoy-{port}.yaml"
        cfg.write_text(yaml.safe_dump(envoy_config(port, upstream, certs, mtls, free_port(), tickets)))
        cmd = [str(ENVOY), "-c", str(cfg), "--concurrency", "1", "-l", "error", "--disable-hot-restart",
               "--base-id", str(3000 + port % 40000)]  # fmt: skip
    else:
        cmd = dev_module_argv("bench.tls", "--serve", str(port), str(upstream), str(certs), kind,
                              "1" if mtls else "0", "1" if tickets else "0")
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
    wait_port(port, 15)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument(
        "--handshakes",
        action="store_true",
        help="only mTLS handshakes/s (new and resumed), with and without session tickets",
    )
    ap.add_argument("--serve", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        port, upstream, certs, kind, mtls, tickets = args.serve
        serve_planemesh(int(port), int(upstream), Path(certs), kind, mtls == "1", tickets == "1")
        return 0
    if args.handshakes:
        return handshake_table(args.duration)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pm-bench-tls-") as tmp:
        work = Path(tmp)
        write_certs(work)
        nginx_port = free_port()
        nginx = start_nginx(work, nginx_port)
        try:
            for kind in ("envoy", "uvloop", "asyncio"):
                port = free_port()
                server = run_server(kind, port, nginx_port, work, False, work)
                try:
                    wrk_tls(port, 1, args.connections)  # warm-up
                    reused = wrk_tls(port, args.duration, args.connections)
                finally:
                    stop(server)
                port = free_port()
                server = run_server(kind, port, nginx_port, work, True, work)
                try:
                    new = handshakes(port, work, args.duration)
                finally:
                    stop(server)
                rows.append((kind, reused, new))
        finally:
            stop(nginx)
    print(f"{'server':>10} {'TLS req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'mTLS handshakes/s':>18}")
    base = rows[0]
    for kind, reused, new in rows:
        print(f"{kind:>10} {reused['rps']:>10.0f} {reused['p50']:>8.3f} {reused['p99']:>8.3f} {new:>18.0f}")
    for kind, reused, new in rows[1:]:
        print(f"{kind} / envoy: req/s {reused['rps'] / base[1]['rps']:.2f}x, handshakes/s {new / base[2]:.2f}x")
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/PID/stat utime, stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def handshake_table(duration: int) -> int:
    """New and resumed mTLS handshakes/s of Envoy and planemesh (uvloop), session tickets on (both defaults)
    and off (DownstreamTlsContext disable_stateless_session_resumption), and the server's CPU time per new
    handshake (/proc: less sensitive than the rate to other work on the machine)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="pm-bench-tls-") as tmp:
        work = Path(tmp)
        write_certs(work)
        for tickets in (True, False):
            for kind in ("envoy", "uvloop"):
                port = free_port()
                server = run_server(kind, port, free_port(), work, True, work, tickets)
                try:
                    handshakes(port, work, 1)  # warm-up
                    before = cpu_s(server.pid)
                    new = handshakes(port, work, duration)
                    cpu_ms = (cpu_s(server.pid) - before) * 1000 / max(new * duration, 1)
                    rows.append((kind, tickets, new, handshakes(port, work, 2, "-reuse"), cpu_ms))
                finally:
                    stop(server)
    print(f"{'server':>8} {'tickets':>8} {'new/s':>8} {'resumed/s':>10} {'CPU ms/new':>11}")
    for kind, tickets, new, reused, cpu_ms in rows:
        print(f"{kind:>8} {'on' if tickets else 'off':>8} {new:>8.0f} {reused:>10.0f} {cpu_ms:>11.2f}")
    by = {(k, t): (n, c) for k, t, n, _, c in rows}
    for tickets in (True, False):
        (pn, pc), (en, ec) = by[("uvloop", tickets)], by[("envoy", tickets)]
        print(f"tickets {'on' if tickets else 'off'}: planemesh / envoy new handshakes/s {pn / en:.2f}x, "
              f"CPU per handshake {pc / ec:.2f}x Envoy's")  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
