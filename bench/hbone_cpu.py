"""CPU per GiB of the HBONE data path in one process (no netns, no Envoy): which h2 codec is cheaper.

    python -m bench hbone_cpu [--mib 256] [--runs 3] [--codec h2|own|own-256k] [--handshakes N] [--default-malloc]

Two HBONE nodes on loopback (tests/proxy/hbone_harness.py: node A's outbound and pool, node B's inbound, a sink
pod), one tunnel, MIB MiB pushed one way; the figure is the process's CPU (user + system) per GiB, client and
sink included, median of RUNS. `--codec`: `h2` = the product (python-hyper h2, 256 KiB frames); `own` = the
proxy's codec (agent/proxy/h2_codec.py) swapped in through `conn.new_h2`, at the 16 KiB frames it accepts;
`own-256k` = the same with its frame limit raised to 256 KiB *in this process only* (what HBONE could get if
that codec took a frame-size setting; not protocol-correct without advertising SETTINGS_MAX_FRAME_SIZE).
`--handshakes N`: instead, N new pooled HBONE connections one after the other (TCP, the mTLS 1.3 handshake with
the source workload's certificate, both h2 prefaces, then closed): the process's CPU per connection (both
nodes' work) and connections per second. Measures, never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import uvloop

from planemesh.agent.hbone import conn
from planemesh.agent.hbone.node import tune_malloc
from planemesh.agent.proxy import h2_codec
from tests.proxy.hbone_harness import ID_A, POD_B, hbone_pair, node_cas


class _OwnCodec:
    """h2_codec's H2ClientCodec/H2ServerCodec with the few h2 calls conn.py makes that it lacks."""

    @staticmethod
    def make(client_side: bool) -> h2_codec.H2Codec:
        base = h2_codec.H2ClientCodec if client_side else h2_codec.H2ServerCodec

        class Adapted(base):  # type: ignore[misc, valid-type]
            local_settings = None
            max_inbound_frame_size = 0

            class incoming_buffer:  # conn.py sets its max_frame_size
                max_frame_size = 0

            @property
            def remote_settings(self):  # type: ignore[no-untyped-def]
                return type("S", (), {"max_concurrent_streams": self.peer_max_concurrent_streams})

            @property
            def open_outbound_streams(self) -> int:
                return len(self.streams)

            def increment_flow_control_window(self, n: int, stream_id: int | None = None) -> None:
                if stream_id is not None:  # the initial connection window is the codec's own (initiate_connection)
                    super().increment_flow_control_window(n, stream_id)

            def send_headers(self, sid, headers, end_stream=False):  # type: ignore[no-untyped-def]
                raw = [(k.encode() if isinstance(k, str) else k, v.encode() if isinstance(v, str) else v)
                       for k, v in headers]  # fmt: skip
                super().send_headers(sid, raw, end_stream)

            def end_stream(self, sid: int) -> None:
                self.send_data(sid, b"", end_stream=True)

        return Adapted(conn.MAX_STREAMS, conn.MAX_STREAMS, conn.STREAM_WINDOW, conn.CONN_WINDOW)


async def one_run(mib: int) -> float:
    total = mib << 20
    got = [0]
    done = asyncio.Event()

    async def sink(host: str) -> asyncio.Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1 << 18):
                got[0] += len(data)
                if got[0] >= total:
                    done.set()
            writer.close()

        return await asyncio.start_server(handle, host, 0)

    ca_a, ca_b = node_cas()
    async with hbone_pair(ca_a, ca_b, server=sink) as pair:
        sock = await pair.open()
        loop = asyncio.get_running_loop()
        chunk = b"x" * (1 << 20)
        cpu = time.process_time()
        for _ in range(mib):
            await loop.sock_sendall(sock, chunk)
        await asyncio.wait_for(done.wait(), 120)
        spent = time.process_time() - cpu
        sock.close()
    return spent / (mib / 1024)


async def new_connections(n: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per new HBONE connection, both ends in this process."""
    ca_a, ca_b = node_cas()
    async with hbone_pair(ca_a, ca_b) as pair:
        pool = pair.outbound.pool
        peer = pair.outbound.routes.peer_for(POD_B)
        assert peer is not None
        ctx = pool.certs.client_context(ID_A)
        for _ in range(5):  # warm-up: imports, the first context use
            (await pool._connect(ctx, peer)).close()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(n):
            (await pool._connect(ctx, peer)).close()
        await asyncio.sleep(0)
        return (time.process_time() - cpu) * 1000 / n, (time.perf_counter() - wall) * 1000 / n


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench hbone_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--codec", choices=("h2", "own", "own-256k"), default="h2")
    parser.add_argument("--handshakes", type=int, default=0)
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's thresholds (before hbone3)")
    args = parser.parse_args(argv)
    if not args.default_malloc:
        tune_malloc()  # as the HBONE node process does (agent/hbone/node.py)
    if args.handshakes:
        runs = [uvloop.run(new_connections(args.handshakes)) for _ in range(args.runs)]
        cpu = statistics.median(r[0] for r in runs)
        wall = statistics.median(r[1] for r in runs)
        print(f"HBONE in-process, {args.handshakes} new connections: CPU {cpu:.2f} ms per connection (both ends), "
              f"{1000 / wall:.0f} connections/s (runs: {', '.join(f'{r[0]:.2f}' for r in runs)} ms)")  # fmt: skip
        return
    if args.codec != "h2":
        conn.new_h2 = _OwnCodec.make  # type: ignore[assignment]
    if args.codec == "own-256k":
        h2_codec.DEFAULT_FRAME_SIZE = conn.MAX_FRAME
    figures = [uvloop.run(one_run(args.mib)) for _ in range(args.runs)]
    print(f"HBONE in-process, codec {args.codec}: CPU per GiB {statistics.median(figures):.2f} s "
          f"(runs: {', '.join(f'{f:.2f}' for f in figures)})")  # fmt: skip
