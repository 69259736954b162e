"""CPU instructions (callgrind) and system calls (strace) per gRPC unary call through the proxy, h2c client ->
h2c backend: figures a busy machine does not move, for A/B of the h2->h2 path.

    ./run.sh bench grpc_instructions [--calls 3000] [--strace] [--get] [--clients 16 --streams 32]
                                     [--before-get 5] [--keep-dump PATH]

bench/grpc.py's nginx backend (gRPC over h2c, one worker) on loopback; the proxy (one PlaneProxy, uvloop, access
log to /dev/null, the backend as an http2 cluster) in its own process under `valgrind --tool=callgrind`. After
2,000 warm-up calls the counters are zeroed, h2load sends N calls (-c16 -m32, gRPC-framed POSTs), the counters
are dumped: instructions retired by the proxy process / N (moves about 1% between runs, whatever the load).
`--strace`: no valgrind; `strace -c -f` on the proxy for N calls: read/write/epoll calls per call (how much one
loop pass coalesces). `--get`: h2load GETs to the backend's HTTP/1.1 port instead (h2 -> HTTP/1.1). ~1.5 min.
`--before-get N`: bench/grpc.py's h2 GET phase (its own proxy process, N s) against the same nginx first (does a
proxy started after it do more work? session 7: no). `--keep-dump`: the callgrind file, for callgrind_annotate.
To compare trees, run it in each (its own venv); everything binds to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import grpc as grpc_bench
from bench.proxy_serve import serve_until_sigterm
from tests.support.net import free_port
from tests.support.procs import dev_module_argv
from tests.support.waiting import wait_port

ROOT = Path(__file__).resolve().parents[1]


def serve(port: int, upstream: int, h2: bool) -> None:
    """Child process: the proxy until SIGTERM."""


    from planemesh.agent.proxy.accesslog import file_sink
    from planemesh.agent.proxy.server import PlaneProxy
    from planemesh.agent.proxy.sockets import make_listener_socket
    from planemesh.model.config import Cluster, ClusterKind, Endpoint
    from tests.proxy.proxy_harness import PLANE, make_snapshot

    cluster = Cluster(name="backend", kind=ClusterKind.STATIC, http2=h2,
                      endpoints=(Endpoint(address="127.0.0.1", port=upstream),))  # fmt: skip
    snap = make_snapshot(port, [("127.0.0.1", upstream)], clusters={"backend": cluster})
    proxy = PlaneProxy(snap, PLANE, access_log=file_sink(os.devnull))
    sock = make_listener_socket(port, transparent=False, host="127.0.0.1")

    serve_until_sigterm(proxy, sock, drain_s=0.2)


def h2load(port: int, calls: int, body: Path | None, clients: int = 16, streams: int = 32) -> int:
    argv = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", f"-n{calls}"]
    if body is None:
        argv.append(f"http://127.0.0.1:{port}/")
    else:
        argv += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
                 f"http://127.0.0.1:{port}{grpc_bench.UNARY}"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=True).stdout
    return int(re.search(r"(\d+) succeeded", out).group(1))  # type: ignore[union-attr]


def measure(
    calls: int,
    use_strace: bool,
    get: bool,
    clients: int = 16,
    streams: int = 32,
    before_get: int = 0,
    keep_dump: str | None = None,
) -> str:
    with tempfile.TemporaryDirectory(prefix="pm-bench-") as tmp:
        work = Path(tmp)
        up, h1 = free_port(), free_port()
        backend = grpc_bench.start_backend(work, up, h1)
        if before_get:  # bench/grpc.py's h2 GET phase first, in its own proxy process, against this backend
            get_port = free_port()
            with grpc_bench.planemesh(work, get_port, h1, False):
                grpc_bench.h2load(work, "planemesh", get_port, before_get, False)
        body = None if get else work / "call.bin"
        if body is not None:
            body.write_bytes(grpc_bench.grpc_message(b"\x0a\x02hi"))
        port = free_port()
        argv = dev_module_argv("bench.grpc_instructions", "--serve", str(port), str(h1 if get else up),
                               "0" if get else "1")  # fmt: skip
        out = work / "callgrind.out"
        if not use_strace:
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv]
        proxy = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONHASHSEED": "0"})  # fmt: skip
        try:
            wait_port(port, timeout=180)
            h2load(port, 2000, body)  # warm-up: the pooled connections, the memos
            if use_strace:
                trace = subprocess.Popen(["strace", "-c", "-f", "-p", str(proxy.pid), "-o", str(work / "st")],
                                         stderr=subprocess.DEVNULL)  # fmt: skip
                time.sleep(1)
                ok = h2load(port, calls, body, clients, streams)
                trace.send_signal(signal.SIGINT)
                trace.wait(timeout=60)
                rows = re.findall(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$",
                                  (work / "st").read_text(), re.M)  # fmt: skip
                return ", ".join(f"{name} {int(n) / ok:.3f}" for n, name in rows if name != "total") + " per call"
            subprocess.run(["callgrind_control", "-z", str(proxy.pid)], capture_output=True, timeout=120, check=True)
            ok = h2load(port, calls, body, clients, streams)
            subprocess.run(["callgrind_control", "-d", str(proxy.pid)], capture_output=True, timeout=120, check=True)
            dump = max(glob.glob(str(out) + ".*"), key=os.path.getmtime)
            if keep_dump:  # for callgrind_annotate
                shutil.copy(dump, keep_dump)
            ir = int(re.search(r"^(?:summary|totals): (\d+)", Path(dump).read_text(), re.M).group(1))  # type: ignore[union-attr]
            return f"{ir / calls / 1000:.1f}k instructions per call ({ok} of {calls} succeeded)"
        finally:
            for proc in (proxy, backend):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--strace", action="store_true", help="system calls per call instead (no valgrind)")
    ap.add_argument("--get", action="store_true", help="h2 GETs to an HTTP/1.1 upstream instead of gRPC to h2c")
    ap.add_argument("--clients", type=int, default=16, help="h2load -c (fewer: less per loop pass)")
    ap.add_argument("--streams", type=int, default=32, help="h2load -m")
    ap.add_argument(
        "--before-get",
        type=int,
        default=0,
        metavar="SECONDS",
        help="run bench/grpc.py's h2 GET phase (its own proxy process) this long first",
    )
    ap.add_argument("--keep-dump", metavar="PATH", help="copy the callgrind dump here (callgrind_annotate)")
    ap.add_argument("--serve", nargs=3, type=int, metavar=("PORT", "UPSTREAM", "H2"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], bool(args.serve[2]))
        return 0
    what = "h2c GET -> HTTP/1.1 nginx" if args.get else "gRPC unary h2c -> h2c nginx"
    figure = measure(args.calls, args.strace, args.get, args.clients, args.streams, args.before_get, args.keep_dump)
    print(f"{what} through the proxy, -c{args.clients} -m{args.streams}: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
