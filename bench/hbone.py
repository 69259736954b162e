"""HBONE (node-to-node mTLS, h2 CONNECT to 15008) vs the plaintext bypass, in the two-node netns lab, and the
same tunnel made by two Envoy 1.40 (`--concurrency 1` each: originator on node A behind the same TC capture,
terminator on node B; the configurations of tests/proxy/test_hbone_envoy_interop.py).

    python -m bench hbone [--mib 64] [--rtts 2000] [--connects 300] [--no-envoy]

Pod A -> pod B across the inter-node link: on the tunnelled ports the connection is captured by node A's TC
program and carried by the two HBONE node processes; on the bypass ports the nodes just route it. Figures:
one-way bulk throughput of one connection (and of 4 at once), request/response latency of 64-byte messages on
one connection, and new connection + first round trip. Measures, never asserts.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from planemesh.agent.hbone.capture import CaptureDatapath
from planemesh.agent.hbone.settings import parse_settings
from planemesh.agent.identity.ca import CertificateAuthority, new_root, utcnow
from planemesh.labs import netns as ns_tools
from tests.netns.hbone_lab import (
    BYPASS_ECHO_PORT,
    BYPASS_PORT,
    CAPTURE_PORT,
    ECHO_PORT,
    ID_A,
    NODE_B_LINK,
    POD_B,
    PORT,
    HboneLab,
    hbone_lab,
    node_a_settings,
    node_b_settings,
)
from tests.proxy.test_hbone_envoy_interop import originator, terminator
from tests.xds.xds_harness import ENVOY

CHUNK = 1 << 20


def bulk(port: int, size: int) -> float:
    """Seconds to push `size` bytes to pod B and get its answer (it reads to EOF, then answers)."""
    block = os.urandom(CHUNK)
    t0 = time.perf_counter()
    with socket.create_connection((POD_B, port), timeout=60) as s:
        for _ in range(size // CHUNK):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        answer = s.recv(256)
    elapsed = time.perf_counter() - t0
    assert answer.startswith(b"B saw %d" % size), answer
    return elapsed


def parallel_bulk(port: int, size: int, n: int) -> float:
    """Seconds for n connections pushing size/n bytes each at once."""
    threads = [threading.Thread(target=bulk, args=(port, size // n)) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _roundtrip(s: socket.socket, msg: bytes) -> None:
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        data = s.recv(len(msg) - len(got))
        assert data, "echo closed"
        got += data


def rtts(port: int, n: int) -> list[float]:
    msg = b"x" * 64
    out = []
    with socket.create_connection((POD_B, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            t0 = time.perf_counter()
            _roundtrip(s, msg)
            out.append(time.perf_counter() - t0)
    return out


def connects(port: int, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection((POD_B, port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _roundtrip(s, b"y" * 64)
        out.append(time.perf_counter() - t0)
    return out


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU of these processes so far (/proc/PID/stat utime, stime)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(
    lab: HboneLab, cases: list[tuple[str, int, int]], mib: int, n_rtt: int, n_conn: int, pids: list[int]
) -> dict:
    """`pids`: the tunnel's processes (both ends), whose CPU per GiB of bulk is a figure contention barely moves."""
    size = mib * CHUNK
    rows: dict[str, dict[str, float]] = {}
    for name, port, echo in cases:

        def run(port: int = port, echo: int = echo) -> dict[str, float]:
            connects(echo, 20)  # warm-up: the pooled HBONE connection exists, pages are touched
            cpu0 = cpu_seconds(pids)
            one = statistics.median(bulk(port, size) for _ in range(3))
            cpu = (cpu_seconds(pids) - cpu0) / (3 * size / (1 << 30))
            four = parallel_bulk(port, size, 4)
            lat = rtts(echo, n_rtt)
            new = connects(echo, n_conn)
            return {
                "Mbit/s 1 conn": size * 8 / one / 1e6, "tunnel CPU s/GiB": cpu,
                "Mbit/s 4 conns": size * 8 / four / 1e6,
                "rtt p50 ms": _pct(lat, 0.5), "rtt p99 ms": _pct(lat, 0.99),
                "connect+rtt p50 ms": _pct(new, 0.5), "connect+rtt p99 ms": _pct(new, 0.99),
            }  # fmt: skip

        rows[name] = ns_tools.call_in(lab.pod_a, run)
    return rows


class NsEnvoy:
    """Envoy 1.40 in a namespace (admin on the namespace's loopback)."""

    def __init__(self, ns: str, workdir: Path, name: str, listeners: list, clusters: list) -> None:
        self.ns, self.admin = ns, 19000 + len(name)
        cfg = {
            "node": {"id": name, "cluster": "bench"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin}}},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        }
        path = workdir / f"envoy-{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.log = (workdir / f"envoy-{name}.log").open("w")
        argv = [str(ENVOY), "-c", str(path), "--base-id", str(3000 + os.getpid() % 20000 + len(name)),
                "--concurrency", "1", "-l", "error", "--disable-hot-restart"]  # fmt: skip
        self.proc = ns_tools.popen(ns, argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not ns_tools.call_in(ns, self._ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"envoy {name} did not start: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        ns_tools.stop(self.proc)
        self.log.close()


def envoy_pair(lab: HboneLab, root: CertificateAuthority) -> list[NsEnvoy]:
    """Envoy as HBONE originator on node A (transparent listener on the capture port) and terminator on node B."""
    ca_a, ca_b = root.intermediate("node-a", now=utcnow()), root.intermediate("node-b", now=utcnow())
    term = terminator(15008, ca_b, root, address=NODE_B_LINK)
    orig = originator(CAPTURE_PORT, "%DOWNSTREAM_LOCAL_ADDRESS%", 15008, ca_a, root, inbound_host=NODE_B_LINK,
                      identity=ID_A, transparent=True)  # fmt: skip
    b = NsEnvoy(lab.node_b, lab.workdir, "b", *term)
    try:
        return [b, NsEnvoy(lab.node_a, lab.workdir, "aa", *orig)]
    except BaseException:
        b.stop()
        raise


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench hbone")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rtts", type=int, default=2000)
    parser.add_argument("--connects", type=int, default=300)
    parser.add_argument("--no-envoy", action="store_true", help="skip the Envoy originator/terminator pair")
    args = parser.parse_args(argv)
    bypass = ("bypass (plaintext)", BYPASS_PORT, BYPASS_ECHO_PORT)
    tunnel = [("HBONE planemesh", PORT, ECHO_PORT)]
    prefix = f"bhb{os.getpid() % 10000}"
    with tempfile.TemporaryDirectory(prefix="bench-hbone-") as tmp, hbone_lab(prefix, Path(tmp)) as lab:
        lab.start_server()
        root = new_root("cluster.local", now=utcnow())
        ca_a = lab.write_ca("ca-a", root.intermediate("node-a", now=utcnow()))
        ca_b = lab.write_ca("ca-b", root.intermediate("node-b", now=utcnow()))
        nodes = [lab.start_node("b", node_b_settings(ca_b)).pid, lab.start_node("a", node_a_settings(ca_a)).pid]
        rows = measure(lab, [bypass], args.mib, args.rtts, args.connects, [])
        rows.update(measure(lab, tunnel, args.mib, args.rtts, args.connects, nodes))
        lab.stop_nodes()  # node A's capture datapath goes with it
        if not args.no_envoy:
            settings = parse_settings(node_a_settings(ca_a))
            assert settings.capture is not None
            capture = ns_tools.call_in(lab.node_a, CaptureDatapath, settings.capture, settings.routes, lab.pin_dir)
            envoys = envoy_pair(lab, root)
            try:
                pids = [e.proc.pid for e in envoys]  # `ip netns exec` execs envoy: same pid
                cases = [("HBONE Envoy 1.40", PORT, ECHO_PORT)]
                rows.update(measure(lab, cases, args.mib, args.rtts, args.connects, pids))
            finally:
                for envoy in envoys:
                    envoy.stop()
                ns_tools.call_in(lab.node_a, capture.close)
    cols = list(next(iter(rows.values())))
    print(f"{'case':20}" + "".join(f"{c:>20}" for c in cols))
    for name, row in rows.items():
        print(f"{name:20}" + "".join(f"{row[c]:20.2f}" for c in cols))
    base, hb = rows["bypass (plaintext)"], rows["HBONE planemesh"]
    print("planemesh / bypass:", ", ".join(f"{c} {hb[c] / base[c]:.2f}x" for c in cols if base[c]))
    if "HBONE Envoy 1.40" in rows:
        env = rows["HBONE Envoy 1.40"]
        print("planemesh / Envoy: ", ", ".join(f"{c} {hb[c] / env[c]:.2f}x" for c in cols))
