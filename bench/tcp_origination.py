"""Relayed TCP originating mTLS (Istio auto-mTLS for tcp_proxy chains) on loopback: planemesh vs Envoy 1.40.

    .venv/bin/python -m bench.tcp_origination [--seconds 8] [--megabytes 256]     # ~1 min

Both proxies take a plaintext client connection and relay it to the same upstream over mTLS, presenting a client
certificate from planemesh's built-in CA, sending the cluster's SNI and ALPN (`istio`) and checking the upstream's
SPIFFE SAN: planemesh's plane proxy (one worker, its sniffing listener relaying a tcp_proxy chain whose cluster
has istiod's `tlsMode: istio` transport_socket_match, agent/proxy/tcp_origination.py) and Envoy (`--concurrency
1`, a tcp_proxy listener to a cluster with an UpstreamTlsContext). The upstream is a Python TLS server that
requires the client certificate, reads until the client's EOF (close_notify) and answers the byte count.

Measured for each proxy (its CPU from /proc/PID/stat, which other work on the machine barely moves):
  - bulk: 4 connections each sending `--megabytes`/4 MB, then half-close: MB/s and proxy CPU ms per MB;
  - new connections: 4 clients, each connection one full mTLS handshake upstream, 100 bytes and the answer:
    connections/s and proxy CPU ms per connection.
Everything binds to 127.0.0.1 and is stopped in `finally`. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import yaml

from bench.proxy_loopback import free_port, wait_port
from bench.proxy_serve import serve_until_sigterm
from bench.tls import ENVOY, ROOT, cpu_s, stop, write_certs
from tests.support.procs import dev_module_argv

T = "type.googleapis.com/"
SERVER_ID = "spiffe://cluster.local/ns/ran/sa/gw"  # bench.tls.write_certs: server.pem is gw, client.pem amf
SNI = "outbound_.5000_._.gw.ran.svc.cluster.local"
CHUNK = b"\xa5" * (256 << 10)


def serve_upstream(port: int, certs: Path) -> None:
    """Child process: the mTLS upstream (a thread per connection; the TLS work is in OpenSSL, without the GIL)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    ctx.load_verify_locations(certs / "root.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["istio"])
    lsock = socket.create_server(("127.0.0.1", port), backlog=512)

    def one(raw: socket.socket) -> None:
        buf = bytearray(1 << 20)
        try:
            with ctx.wrap_socket(raw, server_side=True) as conn:
                total = 0
                while n := conn.recv_into(buf):
                    total += n
                conn.sendall(b"%d" % total)
        except (OSError, ssl.SSLError):
            pass

    print("ready", flush=True)
    while True:
        raw, _ = lsock.accept()
        threading.Thread(target=one, args=(raw,), daemon=True).start()


def serve_planemesh(port: int, upstream: int, certs: Path) -> None:
    """Child process: planemesh's plane proxy, its sniffing listener on `port` relaying every connection (the
    original destination is fixed here) through a tcp_proxy chain to the upstream over mTLS."""
    from planemesh.agent.proxy.server import PlaneProxy
    from planemesh.agent.proxy.sockets import make_listener_socket
    from planemesh.model.config import Cluster, ClusterKind, Endpoint, Listener, ListenerProtocol, WeightedCluster
    from planemesh.model.tls_config import CertSecret, SanMatch, TlsContext, TlsMatch, TrustSecret
    from tests.proxy.proxy_harness import PLANE, make_snapshot

    dst = 5000
    tls = TlsContext(cert="default", trust="ROOTCA", san=(SanMatch("uri", exact=SERVER_ID),), sni=SNI,
                     alpn=("istio-peer-exchange", "istio"))  # fmt: skip
    istio = (("tlsMode", "istio"),)
    cluster = Cluster("db", ClusterKind.STATIC, endpoints=(Endpoint("127.0.0.1", upstream, tls_labels=istio,
                      tls_socket=0),), tls_matches=(TlsMatch("tlsMode-istio", istio, tls),))  # fmt: skip
    chain = Listener("db", PLANE, dst, ListenerProtocol.TCP, tcp_clusters=(WeightedCluster("db", 1),))
    secrets = {
        "default": CertSecret((certs / "client.pem").read_bytes(), (certs / "client.key").read_bytes()),
        "ROOTCA": TrustSecret((certs / "root.pem").read_bytes()),
    }
    base = make_snapshot(free_port(), [], clusters={"db": cluster})
    snap = replace(base, planes=(replace(base.planes[0], sniff_port=port),), listeners=(*base.listeners, chain),
                   secrets=MappingProxyType(secrets))  # fmt: skip
    proxy = PlaneProxy(snap, PLANE, original_destination=lambda sockname, peer: ("127.0.0.1", dst))
    sock = make_listener_socket(port, transparent=False, host="127.0.0.1")

    serve_until_sigterm(proxy, sock)
    print(f"origin: {proxy.sniff_stats.origin.as_dict()}", file=sys.stderr)


def envoy_config(port: int, upstream: int, certs: Path, admin: int, resume: bool = True) -> dict:
    """Envoy's tcp_proxy to the upstream over mTLS; `resume`: its default upstream session cache
    (`max_session_keys` 1: later connections resume the session), else every connection a full handshake."""
    def inline(name: str) -> dict:
        return {"inline_bytes": base64.b64encode((certs / name).read_bytes()).decode()}

    tls = {"@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", "sni": SNI,
           "max_session_keys": 1 if resume else 0,
           "common_tls_context": {
               "tls_certificates": [{"certificate_chain": inline("client.pem"), "private_key": inline("client.key")}],
               "validation_context": {"trusted_ca": inline("root.pem"),
                                      "match_typed_subject_alt_names": [{"san_type": "URI",
                                                                         "matcher": {"exact": SERVER_ID}}]},
               "alpn_protocols": ["istio-peer-exchange", "istio"]}}  # fmt: skip
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "tcp", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                           "filter_chains": [{"filters": [{"name": "tcp", "typed_config": {
                               "@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                               "stat_prefix": "db", "cluster": "db"}}]}]}],
            "clusters": [{"name": "db", "type": "STATIC", "connect_timeout": "2s",
                          "transport_socket": {"name": "tls", "typed_config": tls},
                          "load_assignment": {"cluster_name": "db", "endpoints": [{"lb_endpoints": [{"endpoint": {
                              "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]}}],
        },
    }  # fmt: skip


def exchange(port: int, megabytes: float) -> int:
    """One connection: send `megabytes`, half-close, return the upstream's byte count (-1 on failure)."""
    left = int(megabytes * (1 << 20))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            while left > 0:
                part = CHUNK[: min(left, len(CHUNK))]
                s.sendall(part)
                left -= len(part)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(64):
                out += chunk
            return int(out) if out else -1
    except (OSError, ValueError):
        return -1


def bulk(port: int, pid: int, megabytes: int, streams: int = 4) -> tuple[float, float, bool]:
    """(MB/s, proxy CPU ms per MB, every byte arrived)."""
    each = megabytes / streams
    results: list[int] = []
    before, t0 = cpu_s(pid), time.monotonic()
    threads = [threading.Thread(target=lambda: results.append(exchange(port, each))) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.monotonic() - t0, cpu_s(pid) - before
    intact = results == [int(each * (1 << 20))] * streams
    return megabytes / wall, cpu * 1000 / megabytes, intact


def connections(port: int, pid: int, seconds: float, clients: int = 4) -> tuple[float, float, int]:
    """(connections/s, proxy CPU ms per connection, failures) with `clients` loops of one small exchange each."""
    done, failed = [0], [0]
    deadline = time.monotonic() + seconds

    def loop() -> None:
        while time.monotonic() < deadline:
            if exchange(port, 100 / (1 << 20)) == 100:
                done[0] += 1
            else:
                failed[0] += 1

    before, t0 = cpu_s(pid), time.monotonic()
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.monotonic() - t0, cpu_s(pid) - before
    return done[0] / wall, cpu * 1000 / max(done[0], 1), failed[0]


def run_proxy(kind: str, port: int, upstream: int, certs: Path, work: Path) -> subprocess.Popen:
    if kind.startswith("envoy"):
        cfg = work / "envoy.yaml"
        cfg.write_text(yaml.safe_dump(envoy_config(port, upstream, certs, free_port(), kind == "envoy")))
        cmd = [str(ENVOY), "-c", str(cfg), "--concurrency", "1", "-l", "error", "--disable-hot-restart",
               "--base-id", str(3000 + port % 40000)]  # fmt: skip
    else:
        cmd = dev_module_argv("bench.tcp_origination", "--serve-planemesh", str(port), str(upstream), str(certs))
    proc = subprocess.Popen(cmd, cwd=ROOT)
    wait_port(port, 20)
    return proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="new-connection phase per proxy")
    ap.add_argument("--megabytes", type=int, default=256, help="bulk phase per proxy (4 streams)")
    ap.add_argument("--serve-planemesh", nargs=3, metavar=("PORT", "UPSTREAM", "CERTS"), help=argparse.SUPPRESS)
    ap.add_argument("--serve-upstream", nargs=2, metavar=("PORT", "CERTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_planemesh:
        serve_planemesh(int(args.serve_planemesh[0]), int(args.serve_planemesh[1]), Path(args.serve_planemesh[2]))
        return 0
    if args.serve_upstream:
        serve_upstream(int(args.serve_upstream[0]), Path(args.serve_upstream[1]))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tcp-origination-") as tmp:
        work = Path(tmp)
        write_certs(work)
        up_port = free_port()
        upstream = subprocess.Popen(dev_module_argv("bench.tcp_origination", "--serve-upstream", str(up_port),
                                                    str(work)), cwd=ROOT)  # fmt: skip
        try:
            wait_port(up_port, 20)
            for kind in ("envoy", "envoy (no resumption)", "planemesh"):
                port = free_port()
                proxy = run_proxy(kind, port, up_port, work, work)
                try:
                    connections(port, proxy.pid, 1.0)  # warm-up
                    rate, ms_per_conn, failed = connections(port, proxy.pid, args.seconds)
                    mbps, ms_per_mb, intact = bulk(port, proxy.pid, args.megabytes)
                    rows.append((kind, rate, ms_per_conn, failed, mbps, ms_per_mb, intact))
                finally:
                    stop(proxy)
        finally:
            stop(upstream)
    print("| proxy | new conn/s (4 clients) | proxy CPU ms / conn | failed | bulk MB/s (4 streams) | "
          "proxy CPU ms / MB | intact |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for kind, rate, ms_conn, failed, mbps, ms_mb, intact in rows:
        print(f"| {kind} | {rate:.0f} | {ms_conn:.2f} | {failed} | {mbps:.0f} | {ms_mb:.2f} | {intact} |")
    (_, e_rate, e_conn, _, e_mbps, e_mb, _), _, (_, p_rate, p_conn, _, p_mbps, p_mb, _) = rows
    print(f"planemesh / envoy: conn/s {p_rate / e_rate:.2f}x, CPU per conn {p_conn / e_conn:.2f}x, "
          f"MB/s {p_mbps / e_mbps:.2f}x, CPU per MB {p_mb / e_mb:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
