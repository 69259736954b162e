"""Issue-5 benchmark, one lab, one run: what sniffing costs, side by side.

    ./run.sh bench sniff [--connections 2000] [--bulk-mb 2048] [--seconds 5] [--h2-clients 16] [--h2-streams 32]
                         [--only ttfb|bulk|h2]

The agent runs with plane oam `undeclared: sniff` (plane media keeps `bypass`); nginx (one worker) serves
port 80 (declared HTTP) and 9080 (undeclared); labs/protocol_servers.py serves bulk transfers on 7001.
  (a) time to first byte of `GET /` on a new connection, many sequential connections from the client pod:
      direct (no agent), declared HTTP port (proxy), undeclared port on oam (sniff listener -> proxy); p50/p99.
  (b) opaque passthrough throughput: one bulk TCP transfer each way on 7001, on oam (sniffed -> opaque
      passthrough copy loop) vs on media (the same transfer bypassed in the kernel); Gbit/s.
  (c) HTTP/2 req/s: h2load (h2c prior knowledge, -c clients x -m streams) to port 80 through planemesh (one
      worker) and through Envoy 1.40 (--concurrency 1) behind the same interception (bench/http_proxy.py).
Prints every figure and the ratios the targets are stated in; `--only` runs one case.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.common import scratch_dir, start_nginx
from bench.http_proxy import envoy_in_node, envoy_requests, lab_plane_port, planemesh_requests, wait_http_ok
from planemesh.agent.demo import start_agent
from planemesh.labs import Lab, load_lab
from planemesh.labs import netns as ns_tools
from planemesh.labs.netns import call_in
from planemesh.labs.protocol_servers import BulkResult, bulk_download, bulk_upload
from planemesh.labs.traffic import wait_for_port
from planemesh.model.static_config import default_config_text

DECLARED_PORT, UNDECLARED_PORT, BULK_PORT = 80, 9080, 7001


def sniff_config(path: Path) -> Path:
    """The embedded default with plane oam sniffing its undeclared ports."""
    raw = yaml.safe_load(default_config_text())
    raw["planes"][0]["undeclared"] = "sniff"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- (a) time to first byte ------------------------------------------------------------------------------


@dataclass
class Ttfb:
    name: str
    samples_ms: list[float]

    @property
    def p50(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p99(self) -> float:
        return statistics.quantiles(self.samples_ms, n=100)[98]

    def row(self, base: Ttfb | None) -> str:
        ratio = f"{self.p50 / base.p50:6.2f}x" if base else "      -"
        return f"{self.name:40} {len(self.samples_ms):6d} {self.p50:8.3f} {self.p99:8.3f}  {ratio}"


def _ttfb_samples(address: str, port: int, count: int, warmup: int = 50) -> list[float]:
    """Connect, send one request, time until the first response byte; read to the server's close."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    samples = []
    for i in range(warmup + count):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            sock.connect((address, port))
            sock.sendall(request)
            if not sock.recv(1):
                raise ConnectionError(f"{address}:{port} closed without a response")
            elapsed = time.perf_counter() - started
            while sock.recv(65536):
                pass
        if i >= warmup:
            samples.append(elapsed * 1000)
    return samples


def ttfb(lab: Lab, name: str, port: int, count: int) -> Ttfb:
    return Ttfb(name, call_in(lab.pod_ns("client"), _ttfb_samples, lab.pod_addr("server", "oam", 4), port, count))


# ---- (b) passthrough throughput ------------------------------------------------------------------------------


def bulk(lab: Lab, plane: str, size: int, rounds: int = 3) -> tuple[BulkResult, BulkResult]:
    """(download, upload): the median of `rounds` transfers each way, unhashed (the copy is what we time)."""
    client, address = lab.pod_ns("client"), lab.pod_addr("server", plane, 4)
    downs = [call_in(client, bulk_download, address, BULK_PORT, size, hashed=False) for _ in range(rounds)]
    ups = [call_in(client, bulk_upload, address, BULK_PORT, size, hashed=False) for _ in range(rounds)]
    median = lambda results: sorted(results, key=lambda r: r.gbit_s)[len(results) // 2]  # noqa: E731
    return median(downs), median(ups)


# ---- (c) h2load ------------------------------------------------------------------------------------------------


@dataclass
class H2Result:
    name: str
    rps: float
    succeeded: int
    failed: int  # failed + errored + timed out

    def row(self, base: H2Result | None) -> str:
        ratio = f"{self.rps / base.rps:6.2f}x" if base and base.rps else "      -"
        return f"{self.name:40} {self.rps:10.0f} {self.succeeded:10d} {self.failed:7d}  {ratio}"


def parse_h2load(name: str, out: str) -> H2Result:
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
                  r"(\d+) timeout", out)  # fmt: skip
    if m is None:
        raise ValueError(f"unexpected h2load output:\n{out}")
    return H2Result(name, rps, int(m.group(1)), int(m.group(2)) + int(m.group(3)) + int(m.group(4)))


def h2load(lab: Lab, name: str, port: int, seconds: int, clients: int, streams: int) -> H2Result:
    url = f"http://{lab.pod_addr('server', 'oam', 4)}:{port}/"
    argv = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", f"-D{seconds}", "--warm-up-time=1", url]
    return parse_h2load(name, ns_tools.run(lab.pod_ns("client"), argv, timeout=seconds + 60).stdout)


# ---- the run ------------------------------------------------------------------------------------------------------


@dataclass
class Results:
    ttfb: list[Ttfb]
    bulk: dict[str, tuple[BulkResult, BulkResult]]  # case -> (download, upload)
    h2: list[H2Result]
    proven: dict[str, tuple[int, int]]  # proxy -> (requests it counted, requests h2load completed)


def run(args: argparse.Namespace) -> Results:
    lab = load_lab(prefix=args.prefix)
    size = args.bulk_mb << 20
    res = Results([], {}, [], {})
    case = lambda name: args.only in (None, name)  # noqa: E731
    with scratch_dir() as tmp, lab:
        work = Path(tmp)
        nginx = start_nginx(lab, "server", [DECLARED_PORT, UNDECLARED_PORT], work)
        servers = ns_tools.start_until(
            lab.pod_ns("server"),
            [sys.executable, "-m", "planemesh.labs.protocol_servers", "--bulk", str(BULK_PORT)],
            "ready",
        )
        try:
            wait_for_port(lab.pod_ns("client"), lab.pod_addr("server", "oam", 4) or "", BULK_PORT)
            if case("ttfb"):
                res.ttfb.append(ttfb(lab, "direct (no agent)", DECLARED_PORT, args.connections))
            if case("bulk"):
                res.bulk["direct (no agent)"] = bulk(lab, "oam", size)
            (work / "a").mkdir()
            agent = start_agent(lab, work / "a", ["--config", str(sniff_config(work / "sniff.yaml"))])
            try:
                server = lab.pod_addr("server", "oam", 4) or ""
                wait_http_ok(lab, server, DECLARED_PORT, header=None)
                if case("ttfb"):
                    res.ttfb.append(ttfb(lab, "declared HTTP port (proxy)", DECLARED_PORT, args.connections))
                    res.ttfb.append(ttfb(lab, "undeclared port, sniffed (proxy)", UNDECLARED_PORT, args.connections))
                if case("bulk"):
                    res.bulk["bypassed in the kernel (media)"] = bulk(lab, "media", size)
                    res.bulk["sniffed -> opaque passthrough (oam)"] = bulk(lab, "oam", size)
                if case("h2"):
                    before = planemesh_requests(work / "a")
                    res.h2.append(h2load(lab, "planemesh, 1 worker", DECLARED_PORT, args.seconds, args.h2_clients,
                                         args.h2_streams))  # fmt: skip
                    res.proven["planemesh"] = (planemesh_requests(work / "a") - before, res.h2[-1].succeeded)
            finally:
                ns_tools.stop(agent)
            if not case("h2"):
                return res
            (work / "b").mkdir()
            agent = start_agent(lab, work / "b", ["--datapath-only"])
            try:
                with envoy_in_node(lab, work, lab_plane_port(lab)):
                    wait_http_ok(lab, server, DECLARED_PORT, header="x-envoy-upstream-service-time")
                    before = envoy_requests(lab)
                    res.h2.append(h2load(lab, "envoy 1.40, concurrency 1", DECLARED_PORT, args.seconds,
                                         args.h2_clients, args.h2_streams))  # fmt: skip
                    res.proven["envoy"] = (envoy_requests(lab) - before, res.h2[-1].succeeded)
            finally:
                ns_tools.stop(agent)
        finally:
            ns_tools.stop(servers)
            ns_tools.stop(nginx)
    return res


def report(res: Results, args: argparse.Namespace) -> str:
    lines: list[str] = []
    if res.ttfb:
        lines += [f"(a) time to first byte, {args.connections} sequential new connections, GET / from nginx (ms)",
                  f"{'case':40} {'conns':>6} {'p50':>8} {'p99':>8}  p50 ratio"]  # fmt: skip
        declared = next(t for t in res.ttfb if t.name.startswith("declared"))
        lines += [t.row(declared) for t in res.ttfb]
        sniffed = next(t for t in res.ttfb if t.name.startswith("undeclared"))
        lines += [
            f"sniffed / declared: p50 {sniffed.p50 / declared.p50:.2f}x, p99 {sniffed.p99 / declared.p99:.2f}x "
            f"(+{sniffed.p50 - declared.p50:.3f} ms p50)",
            "",
        ]
    if res.bulk:
        lines += [f"(b) one TCP connection, {args.bulk_mb} MiB each way, median of 3 (Gbit/s)",
                  f"{'case':40} {'download':>9} {'upload':>9}"]  # fmt: skip
        for name, (down, up) in res.bulk.items():
            lines.append(f"{name:40} {down.gbit_s:9.2f} {up.gbit_s:9.2f}")
        base_down, base_up = res.bulk["bypassed in the kernel (media)"]
        pass_down, pass_up = res.bulk["sniffed -> opaque passthrough (oam)"]
        lines += [
            f"passthrough / bypassed: download {pass_down.gbit_s / base_down.gbit_s:.2f}x, "
            f"upload {pass_up.gbit_s / base_up.gbit_s:.2f}x",
            "",
        ]
    if res.h2:
        load = f"-t1 -c{args.h2_clients} -m{args.h2_streams} -D{args.seconds}"
        lines += [
            f"(c) h2load {load} (h2c prior knowledge) to port 80",
            f"{'case':40} {'req/s':>10} {'succeeded':>10} {'failed':>7}  ratio",
        ]
        envoy = next((h for h in res.h2 if h.name.startswith("envoy")), None)
        lines += [h.row(envoy) for h in res.h2]
        ours = next(h for h in res.h2 if h.name.startswith("planemesh"))
        if envoy is not None and envoy.rps:
            lines.append(f"planemesh / envoy h2 req/s: {ours.rps / envoy.rps:.3f}   (target >= 1.0, issue #12)")
        for name, (counted, sent) in res.proven.items():
            lines.append(f"in the path: {name} counted {counted} requests of the {sent} h2load completed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=2000, help="(a) sequential connections per case")
    parser.add_argument("--bulk-mb", type=int, default=2048, help="(b) MiB per transfer")
    parser.add_argument("--seconds", type=int, default=5, help="(c) h2load duration")
    parser.add_argument("--h2-clients", type=int, default=16)
    parser.add_argument("--h2-streams", type=int, default=32)
    parser.add_argument("--only", choices=("ttfb", "bulk", "h2"), help="run one case: (a) ttfb, (b) bulk, (c) h2")
    parser.add_argument("--prefix", default="pmbsniff")
    args = parser.parse_args(argv)
    print(report(run(args), args))


if __name__ == "__main__":
    main()
