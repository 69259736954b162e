"""CPU instructions per proxied HTTP/1.1 request, counted by callgrind: a figure that a busy machine does not move.

    ./run.sh bench proxy_instructions [--requests 3000] [--connections 4] [--h2 [--streams 8]]

nginx on loopback (bench/proxy_loopback.py's), the proxy process (one worker, uvloop, access log to /dev/null)
under `valgrind --tool=callgrind`; after a warm-up of 500 requests the counters are zeroed
(`callgrind_control -z`), `h2load --h1 -n N -cC` sends N requests, the counters are dumped: instructions retired
by the proxy process / N. Wall-clock req/s on a shared 2-core machine move by 2x between runs; this count moves
by about 1%, so it is what a change of the proxy core is compared with (run it on both trees). ~1.5 min.
`--h2`: the client speaks h2c (prior knowledge, `--streams` concurrent streams per connection) to the proxy,
which goes on to nginx over HTTP/1.1: the h2 downstream path's figure.
Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.proxy_loopback import free_port, start_nginx, wait_port

ROOT = Path(__file__).resolve().parents[1]


def _h1load(port: int, requests: int, connections: int, streams: int = 0) -> int:
    """h2load: HTTP/1.1 (streams 0) or h2c with `streams` concurrent streams per connection."""
    proto = ["-m", str(streams)] if streams else ["--h1"]
    out = subprocess.run(
        ["h2load", *proto, "-n", str(requests), "-c", str(connections), f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=900, check=True,
    ).stdout
    return int(re.search(r"(\d+) succeeded", out).group(1))  # type: ignore[union-attr]


def measure(requests: int, connections: int, streams: int = 0) -> tuple[float, int]:
    """(instructions per request, requests that succeeded)."""
    with tempfile.TemporaryDirectory(prefix="pm-bench-") as tmp:
        nginx_port, proxy_port = free_port(), free_port()
        nginx = start_nginx(Path(tmp), nginx_port)
        out = f"{tmp}/callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m",
               "bench.proxy_loopback", "--serve", str(proxy_port), str(nginx_port)]
        proxy = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONHASHSEED": "0"})
        try:
            wait_port(proxy_port, timeout=180)
            _h1load(proxy_port, 500, connections, streams)  # warm-up: connections pooled, caches filled
            subprocess.run(["callgrind_control", "-z", str(proxy.pid)], capture_output=True, timeout=120, check=True)
            ok = _h1load(proxy_port, requests, connections, streams)
            subprocess.run(["callgrind_control", "-d", str(proxy.pid)], capture_output=True, timeout=120, check=True)
        finally:
            for proc in (proxy, nginx):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=180)
        dump = min(f for f in glob.glob(out + ".*"))
        text = Path(dump).read_text()
        ir = int(re.search(r"^(?:summary|totals): (\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    return ir / requests, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--h2", action="store_true", help="h2c from the client (HTTP/1.1 to nginx)")
    ap.add_argument("--streams", type=int, default=8, help="--h2: concurrent streams per connection")
    args = ap.parse_args()
    streams = args.streams if args.h2 else 0
    per_request, ok = measure(args.requests, args.connections, streams)
    what = f"h2c ({streams} streams per connection)" if streams else "HTTP/1.1"
    print(f"{what} through the proxy: {per_request / 1000:.1f}k instructions per request "
          f"({ok} of {args.requests} requests succeeded, {args.connections} connections, callgrind)")
    return 0 if ok == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
