"""A strict plane's mTLS on its sniffing listener (agent/proxy/tls.py plane_tcp_chains, sniff_tls.py) vs Envoy 1.40.

    .venv/bin/python -m bench plane_mtls [--duration 5]      # ~40 s

Loopback, one process each (Envoy --concurrency 1), nginx behind, ECDSA P-256 from planemesh's built-in CA. Each
connection is `openssl s_time -new -www /`: a full mTLS handshake with a client certificate, one HTTP/1.0 GET,
the response, close. Rows:
  - envoy tcp_proxy: a filter chain with a DownstreamTlsContext (client certificate required) and tcp_proxy to
    nginx (Istio's inbound mTLS for a TCP service);
  - planemesh tcp chain: a plaintext tcp_proxy chain on a plane whose SLA says `mtls: strict`: the sniffing
    listener peeks, selects the chain, terminates with the plane's context, relays to nginx;
  - planemesh sniffed port: an undeclared port of the strict plane: peek, terminate, sniff the plaintext
    inside, HTTP/1.0 through the L7 proxy to nginx (no Envoy row: Envoy has no such listener).
Figures: connections/s (sequential client) and server CPU ms per connection (utime+stime of the server
process over the run: barely moved by other work on the machine). Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import yaml

from bench.proxy_loopback import free_port, wait_port
from bench.proxy_serve import serve_until_sigterm
from bench.tls import ENVOY, ROOT, T, certs_and_nginx, cpu_s, s_time_cmd, stop
from bench.tls import envoy_config as tls_envoy_config
from tests.support.procs import dev_module_argv


def serve_planemesh(port: int, upstream: int, certs: Path, mode: str) -> None:
    """Child process: a strict plane whose sniffing listener is `port`; every connection's original destination
    is 127.0.0.1:`upstream` (a transparent socket would report it). `mode` tcp: a plaintext tcp_proxy chain
    declares that port; sniffed: nothing does."""

    from planemesh.agent.proxy.server import PlaneProxy
    from planemesh.agent.proxy.sockets import make_listener_socket
    from planemesh.model.config import Listener, ListenerProtocol
    from planemesh.model.planes import SLA
    from planemesh.model.tls_config import CertSecret, TrustSecret
    from tests.proxy.proxy_harness import PLANE, make_snapshot

    snap = make_snapshot(free_port(), [], sla=SLA(mtls="strict", mtls_trust_domain="cluster.local"))
    chains = (Listener("db", PLANE, upstream, ListenerProtocol.TCP),) if mode == "tcp" else ()
    secrets = {
        "default": CertSecret((certs / "server.pem").read_bytes(), (certs / "server.key").read_bytes()),
        "ROOTCA": TrustSecret((certs / "root.pem").read_bytes()),
    }
    snap = replace(snap, planes=(replace(snap.planes[0], sniff_port=port),), listeners=snap.listeners + chains,
                   secrets=MappingProxyType(secrets))  # fmt: skip
    proxy = PlaneProxy(snap, PLANE, original_destination=lambda sockname, peer: ("127.0.0.1", upstream))
    sock = make_listener_socket(port, transparent=False, host="127.0.0.1")

    serve_until_sigterm(proxy, sock)


def envoy_config(port: int, upstream: int, certs: Path, admin: int) -> dict:
    """bench/tls.py's mTLS listener with tcp_proxy to nginx instead of the HTTP connection manager."""
    cfg = tls_envoy_config(port, upstream, certs, True, admin)
    tcp = {"@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "t",
           "cluster": "nginx"}  # fmt: skip
    cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"] = [{"name": "tcp", "typed_config": tcp}]
    return cfg


def start(kind: str, port: int, upstream: int, work: Path) -> subprocess.Popen:
    if kind == "envoy":
        cfg = work / f"envoy-{port}.yaml"
        cfg.write_text(yaml.safe_dump(envoy_config(port, upstream, work, free_port())))
        cmd = [str(ENVOY), "-c", str(cfg), "--concurrency", "1", "-l", "error", "--disable-hot-restart",
               "--base-id", str(3000 + port % 40000)]  # fmt: skip
    else:
        cmd = dev_module_argv("bench.plane_mtls", "--serve", str(port), str(upstream), str(work), kind)
    proc = subprocess.Popen(cmd, cwd=ROOT)
    wait_port(port, 15)
    return proc


def connections(port: int, work: Path, seconds: int) -> tuple[int, float]:
    """(connections, seconds) of `openssl s_time -new -www /`: each a full mTLS handshake and one GET."""
    cmd = [*s_time_cmd(port, work, seconds), "-www", "/"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False).stdout
    m = re.search(r"(\d+) connections in ([\d.]+) real seconds", out)
    return (int(m.group(1)), float(m.group(2))) if m else (0, float("nan"))


def measure(kind: str, upstream: int, work: Path, duration: int) -> tuple[float, float]:
    port = free_port()
    server = start(kind, port, upstream, work)
    try:
        connections(port, work, 1)  # warm-up (and a check that the path works)
        before = cpu_s(server.pid)
        count, real = connections(port, work, duration)
        return count / real if count else float("nan"), (cpu_s(server.pid) - before) * 1000 / max(count, 1)
    finally:
        stop(server)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        port, upstream, certs, mode = args.serve
        serve_planemesh(int(port), int(upstream), Path(certs), mode)
        return 0
    rows = []
    with certs_and_nginx("pm-bench-plane-mtls-") as (work, nginx_port):
        for kind, label in (("envoy", "envoy tcp_proxy"), ("tcp", "planemesh tcp chain"),
                            ("sniffed", "planemesh sniffed port")):  # fmt: skip
            rows.append((label, *measure(kind, nginx_port, work, args.duration)))
    print(f"{'server':>24} {'mTLS conns/s':>13} {'server CPU ms/conn':>19}")
    for label, rate, cpu in rows:
        print(f"{label:>24} {rate:>13.0f} {cpu:>19.2f}")
    envoy = rows[0]
    for label, rate, cpu in rows[1:]:
        print(f"{label} / envoy: conns/s {rate / envoy[1]:.2f}x, CPU per connection {cpu / envoy[2]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
