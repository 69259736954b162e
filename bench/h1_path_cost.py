"""Where the HTTP/1.1 request path's Python work goes, without sockets: bytecodes executed per request, per function.

    ./run.sh bench h1_path_cost [--requests 200] [--top 40] [--time 20000]

A PlaneProxy (the test harness's snapshot: one route, one STATIC cluster) with one client connection and one
pooled upstream connection on fake transports; each request is a real request head fed to the Downstream's
data_received and a real nginx-like response fed to the UpstreamConnection's: the whole pipeline runs (parsing,
admission, routing, the Attempt, the request head, the relay, the HTTP/1.1 writer, stats, the access record and
its text line), only the sockets are missing. Bytecodes are counted with sys.settrace(f_trace_opcodes): the
count is deterministic, so it says what a change of the per-request path costs (or saves) in a few seconds and
on a busy machine, and which function it is in. `bench/proxy_instructions.py` is the end-to-end figure
(callgrind, real sockets, uvloop, the kernel's side excluded). `--time N`: CPU microseconds per request over N
requests, untraced (noisy on a shared machine). Nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Callable

import uvloop

from planemesh.agent.proxy.accesslog import file_sink
from planemesh.agent.proxy.server import PlaneProxy
from planemesh.agent.proxy.upstream import UpstreamConnection
from tests.proxy.proxy_harness import PLANE, make_snapshot

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: h2load nghttp2/1.52.0\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 10:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 55\r\nConnection: keep-alive\r\n\r\n"
            b"hello from nginx, a small body for the proxy benchmark\n")


class FakeTransport:
    """What the two protocols call on a transport; writes are kept (and checked)."""

    def __init__(self, sockname: tuple[str, int], peername: tuple[str, int]) -> None:
        self.extra = {"sockname": sockname, "peername": peername}
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.extra.get(name, default)

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: return False
    def can_write_eof(self) -> bool: return True
    def write_eof(self) -> None: ...
    def get_write_buffer_size(self) -> int: return 0


class Counter:
    """sys.settrace opcode events, per function."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, frame, event, arg):
        if event == "call":
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
        elif event == "opcode":
            code = frame.f_code
            self.counts[f"{code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno}:{code.co_name}"] += 1
        return self


def wire_h1(proxy: PlaneProxy) -> tuple[Callable[[], None], FakeTransport, FakeTransport]:
    """The proxy's HTTP/1.1 path on fake transports, no sockets: a client connection to port 8080 and one idle
    upstream connection to 127.0.0.1:9999. Returns (one request: REQUEST in, RESPONSE back; the client's
    transport; the upstream's)."""
    proxy._bind_loop()
    proxy.listen_ports.add(8080)
    client = proxy.http1_protocol()
    down = FakeTransport(("127.0.0.1", 8080), ("127.0.0.1", 40000))
    client.connection_made(down)
    key, _ = proxy.pool.key_for(("127.0.0.1", 9999))
    upstream = UpstreamConnection(proxy.pool, key)
    up = FakeTransport(("127.0.0.1", 40001), ("127.0.0.1", 9999))
    upstream.connection_made(up)
    proxy.pool.idle[key] = [upstream]

    def one() -> None:
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)

    return one, down, up


def count_bytecodes(proxy: PlaneProxy, one: Callable[[], None], requests: int) -> Counter:
    """Bytecodes per function over `requests` calls of `one`, the access log's lines formatted inside."""
    counter = Counter()
    sys.settrace(counter)
    for _ in range(requests):
        one()
    proxy.log.flush()
    sys.settrace(None)
    return counter


async def run(requests: int, top: int, timed: int) -> None:
    proxy = PlaneProxy(make_snapshot(8080, [("127.0.0.1", 9999)]), PLANE, access_log=file_sink(os.devnull))
    one, down, up = wire_h1(proxy)
    for _ in range(500):  # warm: caches filled, every code path specialised
        one()
    proxy.log.flush()
    if not (len(up.data) == 500 and down.data[-1].endswith(RESPONSE[-55:])):
        raise SystemExit(f"the path did not proxy: {up.data[-1:]!r} {down.data[-1:]!r}")
    counter = count_bytecodes(proxy, one, requests)
    total = sum(counter.counts.values())
    print(f"{total / requests:.0f} bytecodes per request ({requests} requests, access log formatted)")
    for where, n in counter.counts.most_common(top):
        print(f"{n / requests:8.1f}  {where}")
    if timed:
        t0 = time.process_time()
        for i in range(timed):
            one()
            if i % 1000 == 999:
                proxy.log.flush()
        proxy.log.flush()
        print(f"{(time.process_time() - t0) / timed * 1e6:.1f} us CPU per request, untraced ({timed} requests)")
    proxy.draining = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--time", type=int, default=0, help="also CPU us per request over this many requests")
    args = parser.parse_args(argv)
    uvloop.run(run(args.requests, args.top, args.time))  # the worker's loop (its time() is a C call)


if __name__ == "__main__":
    main()
