"""TLS termination on loopback: planemesh (uvloop's TLS transport vs asyncio's SSLProtocol) vs Envoy 1.40.

    .venv/bin/python -m bench.tls [--duration 5] [--connections 16]
    .venv/bin/python -m bench.tls --handshakes [--duration 5] [--clients 4]   # ~1.8 min
    .venv/bin/python -m bench.tls --instructions [--duration 10]             # callgrind, ~4 min
    .venv/bin/python -m bench.tls --in-memory | --session-memory            # OpenSSL alone, ~15 s each

Each server terminates TLS (ECDSA P-256 certificates from planemesh's built-in CA) and proxies to nginx,
one process / one worker (Envoy --concurrency 1). Measured:
  - req/s and p50/p99 on reused connections: wrk over TLS (server authentication only: wrk sends no client
    certificate), 16 connections;
  - new mTLS handshakes per second: `openssl s_time -new` with a client certificate (each connection one full
    handshake, then closed; no request: Envoy holds an HTTP/1.0 GET's connection open, which would measure that).
    With no request, BoringSSL (Envoy) sends no session ticket at all (it sends its two with the first
    application data), while OpenSSL sends them at the end of the handshake: planemesh's rows pay for tickets,
    Envoy's do not.
--handshakes: new and resumed handshakes/s, sequential and concurrent clients, server CPU per handshake
(handshake_table); --instructions: planemesh's instructions per new handshake under callgrind, tickets on and
off: a figure that other work on the machine does not move; --in-memory: server CPU per in-memory handshake,
the TLS engine (pyOpenSSL, the cryptography wheel's OpenSSL) vs the stdlib's ssl (the system OpenSSL).
Everything binds to 127.0.0.1 and is stopped in `finally`. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import glob
import os
import re
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from bench.proxy_loopback import free_port, start_nginx, wait_port
from bench.proxy_serve import serve_until_sigterm
from tests.support.procs import dev_module_argv

ROOT = Path(__file__).resolve().parents[1]
ENVOY = ROOT / ".venv" / "bin" / "envoy"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"  # Debian's libjemalloc2: an extra row when present
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


def serve_planemesh(port: int, upstream: int, certs: Path, loop_kind: str, mtls: bool, tickets: str = "on") -> None:
    """Child process: planemesh's proxy terminating TLS on `port` until SIGTERM. `tickets`: on (the TLS engine's
    stateless tickets, agent/tls/engine.py) or off."""
    from planemesh.agent.proxy.server import PlaneProxy
    from planemesh.agent.proxy.sockets import make_listener_socket
    from planemesh.model.tls_config import CertSecret, TlsContext, TrustSecret
    from tests.proxy.proxy_harness import PLANE, make_snapshot

    base = make_snapshot(port, [("127.0.0.1", upstream)])
    tls = TlsContext(cert="default", trust="ROOTCA", require_client_cert=mtls, alpn=("http/1.1",),
                     session_tickets=tickets != "off")  # fmt: skip
    secrets = {
        "default": CertSecret((certs / "server.pem").read_bytes(), (certs / "server.key").read_bytes()),
        "ROOTCA": TrustSecret((certs / "root.pem").read_bytes()),
    }
    snap = replace(base, listeners=(replace(base.listeners[0], tls=tls),), secrets=MappingProxyType(secrets))
    proxy = PlaneProxy(snap, PLANE)
    sock = make_listener_socket(port, transparent=False, host="127.0.0.1")

    serve_until_sigterm(proxy, sock, loop_kind=loop_kind)
    print(f"tls: {proxy.tls_stats.as_dict()}", file=sys.stderr)


def envoy_config(port: int, upstream: int, certs: Path, mtls: bool, admin: int, tickets: str = "on") -> dict:
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
                "disable_stateless_session_resumption": tickets == "off"}},
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
    out = subprocess.run(s_time_cmd(port, certs, seconds, mode), capture_output=True, text=True,
                         timeout=seconds + 30, check=False).stdout  # fmt: skip
    m = re.search(r"(\d+) connections in ([\d.]+) real seconds", out)
    return int(m.group(1)) / float(m.group(2)) if m else float("nan")


def s_time_cmd(port: int, certs: Path, seconds: int, mode: str = "-new") -> list[str]:
    files = ["-cert", str(certs / "client.pem"), "-key", str(certs / "client.key"), "-CAfile", str(certs / "root.pem")]
    return ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", mode, "-time", str(seconds), *files]


def parallel_handshakes(port: int, certs: Path, seconds: int, clients: int) -> tuple[float, float]:
    """(new mTLS handshakes/s, client CPU ms per handshake) with `clients` concurrent `openssl s_time -new`."""
    cmd = s_time_cmd(port, certs, seconds)
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(clients)
    ]
    total, real = 0, 0.0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 30)
        m = re.search(r"(\d+) connections in ([\d.]+) real seconds", out)
        if m:
            total, real = total + int(m.group(1)), max(real, float(m.group(2)))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # only the clients were reaped in between
    client_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return (total / real if real else float("nan")), client_cpu * 1000 / max(total, 1)


@contextlib.contextmanager
def certs_and_nginx(prefix: str) -> Iterator[tuple[Path, int]]:
    """A scratch directory with the bench's certificates (write_certs) and nginx on a free port behind it:
    (the directory, nginx's port); both gone on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        work = Path(tmp)
        write_certs(work)
        nginx_port = free_port()
        nginx = start_nginx(work, nginx_port)
        try:
            yield work, nginx_port
        finally:
            stop(nginx)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_server_cmd(
    kind: str, port: int, upstream: int, certs: Path, mtls: bool, workdir: Path, tickets: str = "on"
) -> list[str]:
    if kind == "envoy":
        cfg = workdir / f"envoy-{port}.yaml"
        cfg.write_text(yaml.safe_dump(envoy_config(port, upstream, certs, mtls, free_port(), tickets)))
        return [str(ENVOY), "-c", str(cfg), "--concurrency", "1", "-l", "error", "--disable-hot-restart",
                "--base-id", str(3000 + port % 40000)]  # fmt: skip
    return dev_module_argv("bench.tls", "--serve", str(port), str(upstream), str(certs), kind, "1" if mtls else "0",
                           tickets)  # fmt: skip


def run_server(
    kind: str, port: int, upstream: int, certs: Path, mtls: bool, workdir: Path, tickets: str = "on"
) -> subprocess.Popen:
    cmd = run_server_cmd(kind, port, upstream, certs, mtls, workdir, tickets)
    env = dict(os.environ, LD_PRELOAD=JEMALLOC) if tickets.endswith("+jemalloc") else None
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
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
    ap.add_argument("--instructions", action="store_true", help="instructions per new handshake (callgrind)")
    ap.add_argument("--session-memory", action="store_true", help="RSS per cached TLS session (in memory)")
    ap.add_argument("--in-memory", action="store_true", help="server CPU in OpenSSL per in-memory mTLS handshake")
    ap.add_argument("--clients", type=int, default=4, help="concurrent s_time clients (--handshakes)")
    ap.add_argument("--asyncio", action="store_true", help="--handshakes: also asyncio's SSLProtocol, tickets on")
    ap.add_argument("--serve", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        port, upstream, certs, kind, mtls, tickets = args.serve
        serve_planemesh(int(port), int(upstream), Path(certs), kind, mtls == "1", tickets)
        return 0
    if args.in_memory:
        return in_memory_table()
    if args.session_memory:
        return session_memory()
    if args.instructions:
        return instructions_table(args.duration)
    if args.handshakes:
        return handshake_table(args.duration, args.clients, args.asyncio)
    rows = []
    with certs_and_nginx("pm-bench-tls-") as (work, nginx_port):
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


def measure_server(kind: str, tickets: str, work: Path, duration: int, clients: int) -> tuple[float, ...]:
    """(new/s sequential, new/s with `clients`, server busy fraction then, client CPU ms per handshake,
    resumed/s, server CPU ms per new handshake) of one server."""
    port = free_port()
    server = run_server(kind, port, free_port(), work, True, work, tickets)
    try:
        handshakes(port, work, 1)  # warm-up
        before = cpu_s(server.pid)
        new = handshakes(port, work, duration)
        cpu_ms = (cpu_s(server.pid) - before) * 1000 / max(new * duration, 1)
        before = cpu_s(server.pid)
        par, client_ms = parallel_handshakes(port, work, duration, clients)
        busy = (cpu_s(server.pid) - before) / duration
        return new, par, busy, client_ms, handshakes(port, work, 2, "-reuse"), cpu_ms
    finally:
        stop(server)


def handshake_table(duration: int, clients: int = 4, with_asyncio: bool = False) -> int:
    """New and resumed mTLS handshakes/s of Envoy and planemesh (uvloop), session tickets on (both defaults)
    and off (DownstreamTlsContext disable_stateless_session_resumption). Two loads, the same client for both:
    one `openssl s_time` (sequential: client and server take turns, each handshake's latency counts) and
    `clients` concurrent ones (`srv CPU`: how busy the server was, `client ms`: the clients' CPU per handshake;
    where the clients need more CPU per handshake than the server, the machine's two cores are spent on the
    clients and the server is not saturated). CPU ms per new handshake: the server's /proc CPU time over the
    sequential run, the figure least sensitive to other work, and the server's capacity at equal CPU."""
    with tempfile.TemporaryDirectory(prefix="pm-bench-tls-") as tmp:
        work = Path(tmp)
        write_certs(work)
        runs = [("envoy", "on"), ("uvloop", "on"), ("envoy", "off"), ("uvloop", "off")]
        if with_asyncio:
            runs.insert(2, ("asyncio", "on"))
        rows = [(kind, tickets, *measure_server(kind, tickets, work, duration, clients)) for kind, tickets in runs]
    print(f"{'server':>8} {'tickets':>11} {'new/s seq':>9} {f'new/s x{clients}':>9} {'srv CPU':>7} "
          f"{'client ms':>9} {'resumed/s':>9} {'CPU ms/new':>10}")  # fmt: skip
    for kind, tickets, new, par, busy, client_ms, reused, cpu_ms in rows:
        print(f"{kind:>8} {tickets:>11} {new:>9.0f} {par:>9.0f} {busy:>7.2f} {client_ms:>9.2f} "
              f"{reused:>9.0f} {cpu_ms:>10.2f}")  # fmt: skip
    by = {(r[0], r[1]): r for r in rows}
    for kind, tickets in [(k, t) for k, t in by if k != "envoy"]:
        p, e = by[(kind, tickets)], by[("envoy", "off" if tickets == "off" else "on")]
        print(f"{kind} tickets {tickets}: planemesh / envoy new handshakes/s {p[2] / e[2]:.2f}x sequential, "
              f"{p[3] / e[3]:.2f}x with {clients} clients; CPU per handshake {p[7] / e[7]:.2f}x Envoy's "
              f"(capacity at equal CPU {e[7] / p[7]:.2f}x)")  # fmt: skip
    return 0


def instructions_per_handshake(kind: str, tickets: str, work: Path, seconds: int) -> tuple[float, int]:
    """(instructions per new mTLS handshake, handshakes counted) of one server under callgrind: a figure that
    other work on the machine does not move (bench/proxy_instructions.py does the same per request)."""
    port, out = free_port(), str(work / f"callgrind-{kind}-{tickets}.out")
    inner = run_server_cmd(kind, port, free_port(), work, True, work, tickets)
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *inner]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_port(port, 240)
        handshakes(port, work, 3)  # warm-up: imports, caches, the first contexts
        subprocess.run(["callgrind_control", "-z", str(server.pid)], capture_output=True, timeout=120, check=True)
        out_text = subprocess.run(s_time_cmd(port, work, seconds), capture_output=True, text=True,
                                  timeout=seconds + 60, check=False).stdout  # fmt: skip
        subprocess.run(["callgrind_control", "-d", str(server.pid)], capture_output=True, timeout=120, check=True)
    finally:
        stop(server)
    m = re.search(r"(\d+) connections in", out_text)
    count = int(m.group(1)) if m else 0
    dumps = glob.glob(out + ".*") or glob.glob(out)  # the -d dump; else the one at exit (+ the short shutdown)
    dump = min(dumps)
    ir = int(re.search(r"^(?:summary|totals): (\d+)", Path(dump).read_text(), re.M).group(1))  # type: ignore[union-attr]
    return ir / max(count, 1), count


def instructions_per_request(work: Path, seconds: int, connections: int = 4) -> tuple[float, int]:
    """(instructions per request on reused TLS connections, requests counted): planemesh (uvloop, TLS, no
    client certificate) proxying to nginx under callgrind, wrk over `connections` connections."""
    port, nginx_port, out = free_port(), free_port(), str(work / "callgrind-reused.out")
    nginx = start_nginx(work, nginx_port)
    inner = run_server_cmd("uvloop", port, nginx_port, work, False, work)
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *inner]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_port(port, 240)
        wrk_tls(port, 3, connections)  # warm-up: imports, caches, the handshakes of wrk's connections
        subprocess.run(["callgrind_control", "-z", str(server.pid)], capture_output=True, timeout=120, check=True)
        rps = wrk_tls(port, seconds, connections)["rps"]
        subprocess.run(["callgrind_control", "-d", str(server.pid)], capture_output=True, timeout=120, check=True)
    finally:
        stop(server)
        stop(nginx)
    # wrk's own connections are new for the measured run too (one handshake each): counted in, 4 of thousands
    count = int(rps * seconds)
    dump = min(glob.glob(out + ".*") or glob.glob(out))
    ir = int(re.search(r"^(?:summary|totals): (\d+)", Path(dump).read_text(), re.M).group(1))  # type: ignore[union-attr]
    return ir / max(count, 1), count


def instructions_table(seconds: int) -> int:
    """planemesh only: Envoy under callgrind gave no counter dump (its threads never serve callgrind_control's
    request) and its forced stop truncated the final one."""
    with tempfile.TemporaryDirectory(prefix="pm-bench-tls-") as tmp:
        work = Path(tmp)
        write_certs(work)
        rows = [(t, *instructions_per_handshake("uvloop", t, work, seconds)) for t in ("on", "off")]
        per_request, requests = instructions_per_request(work, seconds)
    for tickets, ir, count in rows:
        print(f"planemesh tickets {tickets:>9}: {ir / 1e6:.2f} M instructions per new mTLS handshake ({count} counted)")
    print(f"planemesh reused TLS connections: {per_request / 1e3:.0f} k instructions per request ({requests} counted, "
          f"including the 4 TLS handshakes of wrk's connections: ~{4 * rows[0][1] / max(requests, 1) / 1e3:.0f} k "
          "of it per request)")  # fmt: skip
    return 0


def server_handshake_ms(server_ctx: Any, client: ssl.SSLContext) -> float:
    """Server CPU (process_time) inside OpenSSL's do_handshake for one in-memory mTLS handshake, tickets
    included (no sockets, no event loop): the stdlib's ssl (an SSLContext) or the TLS engine (an SSL.Context);
    the client is the stdlib's in both."""
    from planemesh.agent.tls.engine import TlsConn

    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(cin, cout)
    if isinstance(server_ctx, ssl.SSLContext):
        sin, sout = ssl.MemoryBIO(), ssl.MemoryBIO()
        s = server_ctx.wrap_bio(sin, sout, server_side=True)
        feed, out = sin.write, sout.read

        def step() -> bool:
            try:
                s.do_handshake()
                return True
            except ssl.SSLWantReadError:
                return False
    else:
        conn = TlsConn(server_ctx, server=True)
        feed, out, step = conn.feed, conn.outgoing, conn.handshake
    spent, done = 0.0, [False, False]
    while not all(done):
        try:
            c.do_handshake()
            done[0] = True
        except ssl.SSLWantReadError:
            pass
        t0 = time.process_time()
        feed(cout.read())
        done[1] = step() or done[1]
        back = out()
        spent += time.process_time() - t0
        cin.write(back)
    return spent * 1000


def _mtls_files(d: Path):  # type: ignore[no-untyped-def]
    """The test CA's client (AMF) files under `d` (root.pem, amf.pem, amf.key: client_ctx's), and the server's
    (GW) issued cert with its CertSecret and TrustSecret."""
    from planemesh.agent.identity.ca import key_pem
    from planemesh.model.tls_config import CertSecret, TrustSecret
    from tests.proxy.test_tls_termination import AMF, GW, NOW, ROOT

    issued, server = ROOT.issue(AMF, now=NOW), ROOT.issue(GW, now=NOW)
    (d / "root.pem").write_bytes(ROOT.root_pem())
    (d / "amf.pem").write_bytes(issued.cert_chain_pem())
    (d / "amf.key").write_bytes(key_pem(issued.key))
    return server, CertSecret(server.cert_chain_pem(), server.key_pem()), TrustSecret(ROOT.root_pem())


def in_memory_table(count: int = 300) -> int:
    """Median server CPU per in-memory mTLS handshake (server_handshake_ms), the variants interleaved: the TLS
    engine (OpenSSL of the cryptography wheel) vs the stdlib's ssl (the system's OpenSSL), tickets on and off."""
    from bench.tls_stdlib import build_context
    from planemesh.agent.tls.engine import build_engine_context
    from tests.proxy.test_tls_termination import TLS, client_ctx

    with tempfile.TemporaryDirectory(prefix="pm-bench-tls-") as tmp:
        d = Path(tmp)
        _, cert, trust = _mtls_files(d)
        off = replace(TLS, session_tickets=False)
        contexts = {"engine on": build_engine_context(TLS, cert, trust, server=True),
                    "engine off": build_engine_context(off, cert, trust, server=True),
                    "stdlib on": build_context(TLS, cert, trust, server=True),  # stateful tickets (bench/tls_stdlib.py)
                    "stdlib off": build_context(off, cert, trust, server=True)}  # fmt: skip
        client = client_ctx(d)
        times: dict[str, list[float]] = {name: [] for name in contexts}
        for _ in range(count):
            for name, ctx in contexts.items():
                times[name].append(server_handshake_ms(ctx, client))
    for name, ms in times.items():
        print(f"{name:>10}: server do_handshake {sorted(ms)[len(ms) // 2]:.3f} ms CPU (median of {count})")
    return 0


def session_memory(count: int = 1500) -> int:
    """RSS per cached TLS session: in-memory mTLS handshakes (MemoryBIO, tests/proxy/test_tls_tickets.py's)
    against a stateful-ticket context with room for all, against one without tickets; RSS growth / count."""
    import gc

    from bench.tls_stdlib import build_context
    from tests.proxy.test_tls_termination import ROOT, TLS, client_ctx
    from tests.proxy.test_tls_tickets import _handshake, _server_ctx

    def rss_mb() -> float:
        gc.collect()
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

    with tempfile.TemporaryDirectory(prefix="pm-bench-tls-") as tmp:
        d = Path(tmp)
        server, cert, trust = _mtls_files(d)
        contexts = {"stateful": _server_ctx(server, ROOT.root_pem(), cache_size=count * 2),
                    "off": build_context(replace(TLS, session_tickets=False), cert, trust, server=True)}  # fmt: skip
        client = client_ctx(d)
        for name, ctx in contexts.items():
            for _ in range(200):
                _handshake(ctx, client)
            before = rss_mb()
            for _ in range(count):
                _handshake(ctx, client)
            grown = rss_mb() - before
            print(f"tickets {name:>8}: {ctx.session_stats()['number']} sessions cached, RSS +{grown:.1f} MB over "
                  f"{count} handshakes ({grown * 1e6 / count / 1000:.1f} KB each)")  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
