"""gRPC (and plain h2) through the proxy vs Envoy 1.40, same run, loopback only:

    ./run.sh bench grpc [--seconds 5] [--calls 64] [--streams 16] [--only get|unary|grpcio|stream]
                        [--phases unary,get,unary,envoy:unary] [--shared-backend] [--trace]

One planemesh worker (a PlaneProxy in its own process, the test harness's, access log to a file) and Envoy
`--concurrency 1` (file access log), in front of a backend, nginx (one worker; a C server, so that the proxies and
not the backend are measured): over h2c it answers `/bench.Bench/Unary` with one 18-byte message and
`/bench.Bench/Stream` with 1,000 100-byte messages, each with `grpc-status: 0` trailers; over HTTP/1.1 a small
page. Each proxy's cluster speaks h2c to the former, HTTP/1.1 to the latter. Loads:

- get: `h2load -c16 -m32` GETs, HTTP/1.1 upstream (bench/sniff.py's h2 case without the interception);
- unary: `h2load -c16 -m32` of gRPC-framed POSTs (content-type application/grpc, te: trailers);
- grpcio: the grpcio (grpc.aio) client with `--calls` unary calls in flight (the Python client is the bottleneck
  here: proof that a real gRPC stack works at load more than a ratio);
- stream: grpcio, `--streams` server-streaming calls in flight, each reading 1,000 messages (rate: messages/s).

Every load is a phase of its own: a fresh proxy process (warmed up first) and a fresh nginx, planemesh's then
Envoy's, so that the two figures of one load are taken seconds apart and nothing a previous phase left in the
backend reaches the next (`--shared-backend`: one nginx for the whole run, as in session 6; `--phases`: any
sequence, to look for such carry-overs). Each row: rate, p50/p99 per call (h2load's per-request log, or timed by
the client), the proxy process's CPU per call (/proc: user + system over the load), and, per call, counts a busy
machine does not move: the proxy's read/write system calls and bytes, its minor faults, the backend's CPU.
Like Envoy's configuration here (an HCM without `tracing`), planemesh's listener adds no trace context unless
`--trace` (since session 8; before, it added traceparent and B3 headers, ~165 bytes upstream per call).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.http_proxy import envoy_binary
from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.model.config import DEFAULT_TRACE, Cluster, ClusterKind, Endpoint
from tests.proxy.proxy_harness import ServingProxy, free_port, make_snapshot

UNARY = "/bench.Bench/Unary"
STREAM = "/bench.Bench/Stream"
STREAM_MESSAGES = 1000


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# ---- the backend and the proxies ------------------------------------------------------------------------------


def start_backend(work: Path, port: int, h1_port: int) -> subprocess.Popen:
    """nginx, one worker: gRPC over h2c on `port`, a small page over HTTP/1.1 on `h1_port`."""
    root = work / "www" / "bench.Bench"
    root.mkdir(parents=True)
    (root / "Unary").write_bytes(grpc_message(b"\x0a\x10" + b"p" * 16))
    (root / "Stream").write_bytes(grpc_message(b"\x0a\x62" + b"s" * 98) * STREAM_MESSAGES)
    (work / "www" / "index.html").write_text("planemesh bench " * 8)
    conf = work / "nginx.conf"
    conf.write_text(
        textwrap.dedent(f"""\
        daemon off; master_process off; worker_processes 1; pid {work}/nginx.pid;
        error_log {work}/nginx-error.log;
        events {{ worker_connections 4096; }}
        http {{
          access_log off; keepalive_requests 1000000; keepalive_timeout 120s; http2_max_concurrent_streams 1000;
          client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
          uwsgi_temp_path {work}; scgi_temp_path {work};
          server {{
            listen 127.0.0.1:{port} http2 backlog=4096;
            root {work}/www;
            default_type application/grpc;
            error_page 405 =200 $uri;  # a static file answers POST
            add_trailer grpc-status 0 always;
          }}
          server {{ listen 127.0.0.1:{h1_port} backlog=4096; root {work}/www; }}
        }}
    """)
    )
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-e", str(work / "nginx-error.log")])
    wait_port(port)
    wait_port(h1_port)
    return proc


ENVOY = """\
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: grpc
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: grpc
          access_log:
          - name: envoy.access_loggers.file
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog,
                           path: {log}}}
          route_config:
            virtual_hosts:
            - {{name: any, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: backend}}}}]}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 2s
{protocol}    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {backend}}}}}}}
"""


ENVOY_H2_UPSTREAM = """\
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
"""


@contextlib.contextmanager
def envoy(work: Path, port: int, backend: int, http2: bool) -> Iterator[subprocess.Popen]:
    conf = work / "envoy.yaml"
    conf.write_text(ENVOY.format(admin=free_port(), port=port, backend=backend, log=work / "envoy-access.log",
                                 protocol=ENVOY_H2_UPSTREAM if http2 else ""))  # fmt: skip
    argv = [envoy_binary(), "-c", str(conf), "--concurrency", "1", "--base-id", str(os.getpid() % 50000 + 2000),
            "--disable-hot-restart", "-l", "warning"]  # fmt: skip
    with _process(argv, port) as proc:
        yield proc


@contextlib.contextmanager
def planemesh(work: Path, port: int, backend: int, http2: bool, trace: bool = False) -> Iterator[subprocess.Popen]:
    argv = [sys.executable, "-m", "bench.grpc", "--serve", str(port), str(backend), str(work / "pm-access.log"),
            "h2" if http2 else "h1", "trace" if trace else "no-trace"]  # fmt: skip
    with _process(argv, port) as proc:
        yield proc


@contextlib.contextmanager
def _process(argv: list[str], port: int) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(argv, cwd=Path(__file__).resolve().parent.parent)
    try:
        wait_port(port, 20)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(proc: subprocess.Popen) -> float:
    """User + system CPU the process (all its threads) has used so far."""
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


COUNTS = ("syscr", "syscw", "rchar", "wchar", "minflt")


def counts(proc: subprocess.Popen) -> dict[str, int]:
    """What the process (all its threads) has done so far, as counts a busy machine does not move: read-type and
    write-type system calls (one per loop pass and socket that had data, so they say how much a pass batches),
    bytes through them, minor page faults."""
    io = dict(line.split(": ") for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines())
    stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {**{k: int(io[k]) for k in COUNTS[:4]}, "minflt": int(stat[7])}


def serve(port: int, backend: int, log_path: str, http2: bool, trace: bool) -> None:
    """The planemesh side: one PlaneProxy (as one worker runs it) on 127.0.0.1:port, a cluster to the backend
    (h2c when http2, else HTTP/1.1), the access log appended to a file; until SIGTERM. Its listener adds trace
    context only with `trace` (--trace): Envoy's configuration here has no tracing, as an HCM without `tracing`
    (docs/traffic.md, Tracing)."""
    log = open(log_path, "a")  # noqa: SIM115
    sock = make_listener_socket(port, transparent=False, host="127.0.0.1")
    cluster = Cluster(name="backend", kind=ClusterKind.STATIC, http2=http2,
                      endpoints=(Endpoint(address="127.0.0.1", port=backend),))  # fmt: skip
    snapshot = make_snapshot(port, [("127.0.0.1", backend)], clusters={"backend": cluster})
    listener = dataclasses.replace(snapshot.listeners[0], trace_sampling=DEFAULT_TRACE if trace else None)
    snapshot = dataclasses.replace(snapshot, listeners=(listener,))
    proxy = PlaneProxy(snapshot, "oam", access_log=log.write)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with ServingProxy(proxy, sock):
        stop.wait()
    log.close()


# ---- the loads ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    proxy: str
    load: str
    rate: float  # calls/s (messages/s for streaming)
    p50_ms: float
    p99_ms: float
    failed: int
    units: int  # calls (messages for streaming) completed
    cpu_s: float = 0.0  # the proxy process's CPU during the load
    head_bytes: float = 0.0  # HPACK bytes of response heads and trailers per call, as h2load counts them
    backend_cpu_s: float = 0.0  # the backend's (nginx's one process) CPU during the load
    counts: dict[str, int] = field(default_factory=dict)  # the proxy's counts() over the load
    probe_ms: tuple[float, float] = (0.0, 0.0)  # machine_probe() just before and just after the load

    def per_call(self) -> str:
        n = max(self.units, 1)
        read, write, rx, tx, faults = (self.counts.get(k, 0) / n for k in COUNTS)
        return (f"{self.load:28} {self.proxy:10} {read:6.3f} {write:6.3f} {rx:7.1f} {tx:7.1f} {faults:6.3f} "
                f"{self.backend_cpu_s * 1e6 / n:8.1f}  {self.probe_ms[0]:5.1f} / {self.probe_ms[1]:5.1f}")  # fmt: skip

    @property
    def cpu_us(self) -> float:
        return self.cpu_s * 1e6 / self.units if self.units else 0.0

    def row(self, envoy: Result | None) -> str:
        ratio = f"{self.rate / envoy.rate:5.2f}x" if envoy and envoy.rate else "    -"
        cpu = f"{self.cpu_us / envoy.cpu_us:5.2f}x" if envoy and envoy.cpu_us else "    -"
        head = f"{self.head_bytes:7.1f}" if self.head_bytes else "      -"
        return (f"{self.load:28} {self.proxy:10} {self.rate:9.0f} {self.p50_ms:8.2f} {self.p99_ms:8.2f} "
                f"{self.failed:6d}  {ratio} {self.cpu_us:9.1f}  {cpu} {head}")  # fmt: skip


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    if len(samples_ms) < 2:
        return (samples_ms[0] if samples_ms else 0.0), (samples_ms[0] if samples_ms else 0.0)
    q = statistics.quantiles(samples_ms, n=100)
    return q[49], q[98]


def h2load(work: Path, proxy: str, port: int, seconds: int, grpc_call: bool) -> Result:
    """h2load -c16 -m32: gRPC-framed unary POSTs, or GETs of the small page (the h2 case of bench/sniff.py)."""
    log = work / f"h2load-{proxy}-{grpc_call}.log"
    # No --warm-up-time (the phase warmed up already): its requests reach the proxy but not h2load's count, so
    # the CPU per call was CPU over warm-up + D / the calls of D alone (session 6: ~1.2x for both proxies).
    argv = ["h2load", "-t1", "-c16", "-m32", f"-D{seconds}", f"--log-file={log}"]
    if grpc_call:
        body = work / "unary-request.bin"
        body.write_bytes(grpc_message(b"\x0a\x02hi"))
        argv += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
                 f"http://127.0.0.1:{port}{UNARY}"]  # fmt: skip
    else:
        argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    if rate is None or done is None:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    samples = []
    for line in log.read_text().splitlines():  # start (us since epoch), status, duration (us)
        parts = line.split()
        if len(parts) == 3 and parts[1] == "200":
            samples.append(int(parts[2]) / 1000)
    p50, p99 = percentiles(samples)
    failed = sum(int(x) for x in done.groups()[1:])
    load = "gRPC unary (h2load)" if grpc_call else "h2 GET, HTTP/1.1 up (h2load)"
    result = Result(proxy, load, float(rate.group(1)), p50, p99, failed, int(done.group(1)))
    result.head_bytes = header_bytes(out) / max(result.units, 1)
    return result


def header_bytes(out: str) -> float:
    """The header bytes h2load received ("traffic: ... 1.2MB (1258291) headers (space savings ...)")."""
    found = re.search(r"traffic: .*?, \S+ \((\d+)\) headers", out)
    return float(found.group(1)) if found else 0.0


async def _grpcio(port: int, seconds: float, concurrency: int, streaming: bool) -> tuple[int, list[float], int]:
    calls = 0
    failed = 0
    samples: list[float] = []
    ident = (lambda b: b, lambda b: b)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary(UNARY, *ident)
        stream = channel.unary_stream(STREAM, *ident)
        await unary(b"\x0a\x02hi", timeout=5)  # connected
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal calls, failed
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    if streaming:
                        n = 0
                        async for _ in stream(b"\x0a\x02hi", timeout=10):
                            n += 1
                        if n != STREAM_MESSAGES:
                            failed += 1
                            continue
                    else:
                        await unary(b"\x0a\x02hi", timeout=5)
                except grpc.RpcError:
                    failed += 1
                    continue
                samples.append((time.perf_counter() - t0) * 1000)
                calls += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return calls, samples, failed


def grpcio_load(proxy: str, port: int, seconds: int, concurrency: int, streaming: bool) -> Result:
    t0 = time.perf_counter()
    calls, samples, failed = asyncio.run(_grpcio(port, seconds, concurrency, streaming))
    elapsed = time.perf_counter() - t0
    p50, p99 = percentiles(samples)
    if streaming:
        n = calls * STREAM_MESSAGES
        return Result(proxy, "gRPC server stream (grpcio)", n / elapsed, p50, p99, failed, n)
    return Result(proxy, "gRPC unary (grpcio)", calls / elapsed, p50, p99, failed, calls)


def machine_probe(rounds: int = 3) -> float:
    """CPU ms of a fixed pure-Python task (median of `rounds`): how fast the machine runs Python code right now.
    With nothing of the bench running, the same work took 39-63 ms on the shared 2-core VM within a minute
    (session 7): a phase whose probe reads slow ran on a slow machine, whatever the proxy."""

    def task() -> float:
        table: dict[int, int] = {}
        t0 = time.thread_time()
        for i in range(300_000):
            table[i & 1023] = table.get((i * 7) & 1023, 0) + 1
            str(i)
        return (time.thread_time() - t0) * 1000

    return statistics.median(task() for _ in range(rounds))


def measured(proc: subprocess.Popen, load, *args, backend: subprocess.Popen | None = None) -> Result:
    """load(*args), with the proxy process's CPU and counts over it (and the backend's CPU)."""
    before, counted = cpu_seconds(proc), counts(proc)
    backend_before = cpu_seconds(backend) if backend else 0.0
    result = load(*args)
    result.cpu_s = cpu_seconds(proc) - before
    result.counts = {k: v - counted[k] for k, v in counts(proc).items()}
    result.backend_cpu_s = cpu_seconds(backend) - backend_before if backend else 0.0
    return result


LOADS = ("get", "unary", "grpcio", "stream")
RUNNERS = {"planemesh": planemesh, "envoy": envoy}


@dataclass
class Backend:
    proc: subprocess.Popen
    grpc_port: int  # h2c
    h1_port: int

    @classmethod
    def start(cls, work: Path) -> Backend:
        work.mkdir()
        grpc_port, h1_port = free_port(), free_port()
        return cls(start_backend(work, grpc_port, h1_port), grpc_port, h1_port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def parse_phases(text: str) -> list[tuple[str, str]]:
    """ "unary,get,unary,envoy:unary" -> [(proxy, load), ...]; a phase without a proxy is planemesh's."""
    phases = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        proxy, _, load = item.rpartition(":")
        proxy = {"": "planemesh", "pm": "planemesh"}.get(proxy, proxy)
        if proxy not in RUNNERS or load not in LOADS:
            raise SystemExit(f"--phases: {item!r} is not [planemesh:|pm:|envoy:]{'|'.join(LOADS)}")
        phases.append((proxy, load))
    return phases


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The phases to run, in order: --phases as given, else each load (or --only's) for planemesh then Envoy,
    so that both proxies' figures for one load are measured within seconds of each other."""
    if args.phases:
        return parse_phases(args.phases)
    return [(proxy, load) for load in ((args.only,) if args.only else LOADS) for proxy in RUNNERS]


def run_phase(work: Path, backend: Backend, proxy: str, load: str, args: argparse.Namespace) -> Result:
    """One load through a fresh process of `proxy` (after a warm-up of its upstream pool)."""
    port = free_port()
    http2 = load != "get"
    options = {"trace": args.trace} if proxy == "planemesh" else {}
    with RUNNERS[proxy](work, port, backend.grpc_port if http2 else backend.h1_port, http2, **options) as proc:
        if http2:
            grpcio_load(proxy, port, 1, 4, False)
        else:
            h2load(work, proxy, port, 1, False)
        before = machine_probe()
        if load in ("get", "unary"):
            result = measured(proc, h2load, work, proxy, port, args.seconds, http2, backend=backend.proc)
        else:
            concurrency = args.calls if load == "grpcio" else args.streams
            result = measured(proc, grpcio_load, proxy, port, args.seconds, concurrency, load == "stream",
                              backend=backend.proc)  # fmt: skip
        result.probe_ms = (before, machine_probe())
        return result


def run(args: argparse.Namespace) -> list[Result]:
    """Every phase in a fresh proxy process; with a fresh backend too unless --shared-backend (session 6's
    arrangement, where one nginx served the whole run)."""
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="planemesh-grpc-") as tmp:
        work = Path(tmp)
        shared = Backend.start(work / "backend") if args.shared_backend else None
        try:
            for i, (proxy, load) in enumerate(plan(args)):
                backend = shared or Backend.start(work / f"backend-{i}")
                try:
                    results.append(run_phase(work, backend, proxy, load, args))
                finally:
                    if backend is not shared:
                        backend.stop()
        finally:
            if shared:
                shared.stop()
    return results


def report(results: list[Result]) -> str:
    lines = [
        f"{'load':28} {'proxy':10} {'rate/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6}  ratio "
        f"{'CPU us/call':>9}  ratio head B (rate/s: calls, streaming: messages; CPU: the proxy process's per "
        "call; head B: HPACK bytes of response heads and trailers per call, h2load rows)"
    ]
    for r in results:
        envoy_result = next((e for e in results if e.proxy == "envoy" and e.load == r.load), None)
        lines.append(r.row(envoy_result))
    lines += [
        "",
        f"{'per call':28} {'proxy':10} {'reads':>6} {'writes':>6} {'B in':>7} {'B out':>7} {'faults':>6} "
        f"{'nginx us':>8}  probe ms before / after (the proxy's read/write-type system calls, bytes through "
        "them and minor faults per call, /proc/PID/io and stat; the backend's CPU per call: counts a busy "
        "machine does not move; probe: CPU ms of a fixed Python task around the load, the machine's speed)",
    ]
    lines += [r.per_call() for r in results]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--serve"]:
        return serve(int(argv[1]), int(argv[2]), argv[3], argv[4] == "h2", argv[5] == "trace")
    parser = argparse.ArgumentParser(prog="python -m bench grpc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=64, help="grpcio unary calls in flight")
    parser.add_argument("--streams", type=int, default=16, help="grpcio streaming calls in flight")
    parser.add_argument("--only", choices=LOADS)
    parser.add_argument("--trace", action="store_true",
                        help="planemesh's listener adds trace context (Envoy's config has no tracing; default: off)")
    parser.add_argument(
        "--phases",
        help="run these phases in this order instead, each in a fresh proxy process: "
        "comma-separated [planemesh:|pm:|envoy:]LOAD, e.g. unary,get,unary,envoy:unary",
    )
    parser.add_argument(
        "--shared-backend",
        action="store_true",
        help="one nginx for the whole run (session 6's arrangement) instead of one per phase",
    )
    args = parser.parse_args(argv)
    for tool in ("nginx", "h2load"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    print(report(run(args)))


if __name__ == "__main__":
    main(sys.argv[1:])
