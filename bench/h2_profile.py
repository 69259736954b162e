"""Where one worker's time goes under h2load (h2c, -c16 -m32), in-process: a PlaneProxy on loopback (the test
harness's), nginx (one worker) on loopback behind it, cProfile on the proxy's thread only.

    .venv/bin/python -m bench.h2_profile [--seconds 5] [--no-profile] [--top 40]

Loopback only. Not a comparison with Envoy (bench/sniff.py --only h2 is): a quick A/B of the h2 path's cost, and
the profile that says where it goes. req/s under cProfile is about half of the plain figure.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import grpc as grpc_bench
from bench.common import nginx_conf
from planemesh.model.config import Cluster, ClusterKind, Endpoint
from tests.proxy.proxy_harness import ProxyThread, free_port


class Sampler(threading.Thread):
    """A statistical profile of one thread (sys._current_frames every `interval` s): unlike cProfile it does not
    inflate Python calls against C ones, and time in a C call (a socket write, the event loop's wait) shows as
    its Python caller's."""

    def __init__(self, target: threading.Thread, interval: float = 0.0005) -> None:
        super().__init__(daemon=True)
        self.target, self.interval = target, interval
        self.leaf: collections.Counter[str] = collections.Counter()
        self.inclusive: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            frame = sys._current_frames().get(self.target.ident or 0)
            if frame is not None:
                self.samples += 1
                self.leaf[_where(frame)] += 1
                seen = set()
                while frame is not None:
                    where = _where(frame)
                    if where not in seen:
                        seen.add(where)
                        self.inclusive[where] += 1
                    frame = frame.f_back
            time.sleep(self.interval)

    def report(self, top: int) -> str:
        lines = [f"{self.samples} samples; leaf (self) %:"]
        lines += [f"{100 * n / self.samples:6.1f}  {w}" for w, n in self.leaf.most_common(top)]
        lines.append("inclusive %:")
        lines += [f"{100 * n / self.samples:6.1f}  {w}" for w, n in self.inclusive.most_common(top)]
        return "\n".join(lines)


def _where(frame) -> str:
    code = frame.f_code
    return f"{code.co_filename.rsplit('/', 2)[-1]}:{code.co_name}"


class ProfiledProxy(ProxyThread):
    profile: cProfile.Profile | None = None

    def _run(self) -> None:
        if self.profile is None:
            return super()._run()
        self.profile.enable()
        try:
            super()._run()
        finally:
            self.profile.disable()


def nginx(workdir: Path, port: int) -> subprocess.Popen:
    conf = nginx_conf(workdir, f"listen 127.0.0.1:{port} backlog=4096;")
    return subprocess.Popen(["nginx", "-c", str(conf), "-e", str(workdir / "nginx-error.log")])


def h2load(port: int, seconds: int, clients: int, streams: int, grpc_body: Path | None = None) -> str:
    argv = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", f"-D{seconds}", "--warm-up-time=1"]
    if grpc_body is None:
        argv.append(f"http://127.0.0.1:{port}/")
    else:  # gRPC-framed unary calls to an h2c backend
        argv += ["-d", str(grpc_body), "-H", "content-type: application/grpc", "-H", "te: trailers",
                 f"http://127.0.0.1:{port}{grpc_bench.UNARY}"]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--sample", action="store_true", help="a statistical profile instead of cProfile")
    parser.add_argument("--dump", help="write the pstats file here")
    parser.add_argument("--grpc", action="store_true", help="gRPC unary calls to an h2c backend (bench/grpc.py's)")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        body = None
        if args.grpc:
            server = grpc_bench.start_backend(Path(tmp), port, free_port())
            body = Path(tmp) / "request.bin"
            body.write_bytes(grpc_bench.grpc_message(b"\x0a\x02hi"))
            cluster = Cluster(name="backend", kind=ClusterKind.STATIC, http2=True,
                              endpoints=(Endpoint(address="127.0.0.1", port=port),))  # fmt: skip
            clusters = {"backend": cluster}
        else:
            server = nginx(Path(tmp), port)
            clusters = None
        try:
            proxy = ProfiledProxy([("127.0.0.1", port)], clusters=clusters)
            if not args.no_profile and not args.sample:
                proxy.profile = cProfile.Profile()
            sampler = Sampler(proxy.thread) if args.sample else None
            with proxy:
                h2load(proxy.port, 1, 4, 4, body)  # warm the pools
                if sampler is not None:
                    sampler.start()
                t0 = os.times()
                opened = proxy.proxy.stats.upstream_total
                out = h2load(proxy.port, args.seconds, args.clients, args.streams, body)
                t1 = os.times()
                opened = proxy.proxy.stats.upstream_total - opened
                if sampler is not None:
                    sampler.running = False
        finally:
            server.terminate()
            server.wait()
    rps = re.search(r"finished in .*?, ([\d.]+) req/s", out)
    done = re.search(r"requests: .*", out)
    print(f"req/s {rps.group(1) if rps else '?'}  {done.group(0) if done else out}")
    n = int(done.group(0).split()[1]) if done else 0
    user, system = t1.user - t0.user, t1.system - t0.system
    per = 1e6 / max(n, 1)
    print(
        f"proxy CPU: user {user:.2f} s, system {system:.2f} s; per request {per * (user + system):.1f} us "
        f"(user {per * user:.1f})"
    )
    print(f"upstream connections opened during the run: {opened}")
    if sampler is not None:
        print(sampler.report(args.top))
    if proxy.profile is not None:
        text = io.StringIO()
        stats = pstats.Stats(proxy.profile, stream=text)
        stats.sort_stats("tottime").print_stats(args.top)
        if args.dump:
            stats.dump_stats(args.dump)
        print(text.getvalue())


if __name__ == "__main__":
    main()
