"""CPU instructions per request of the h2 codec alone (agent/proxy/h2_codec.py with its HPACK coder), counted by
callgrind: no sockets, no event loop, a figure the other work on a shared machine does not move (about 2%).

    ./run.sh bench h2_codec_cost [--requests 2000]

Two loops, each run in a child under `valgrind --tool=callgrind` for N and 2N requests (the difference over N is
the per-request figure, start-up and imports cancel out):
- server: a client connection's h2load-like GETs (the same indexed request block each time, 16 per read) are
  received, each answered with nginx's 8 response fields and a 128-byte body (HEADERS, DATA with END_STREAM);
- client: an h2c upstream's gRPC calls: request head (with a new x-request-id each) and body sent, the
  response head, a 23-byte message and the `grpc-status` trailers received, the DATA acknowledged.
The peers' blocks are made by hpack's encoder (prepared outside the count). Run it on two trees to compare.
"""

from __future__ import annotations

import argparse
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import h2.events as ev
import hpack

from planemesh.agent.proxy import h2_codec as c
from planemesh.labs import h2_frames as hf
from tests.support.procs import dev_module_argv

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:8080"), (b":path", b"/"),
           (b"user-agent", b"h2load nghttp2/1.52.0")]  # fmt: skip
RESPONSE = [(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"date", b"Sun, 06 Dec 2026 07:34:47 GMT"),
            (b"content-type", b"text/html"), (b"content-length", b"128"),
            (b"last-modified", b"Sun, 06 Dec 2026 07:34:47 GMT"), (b"etag", b'"6b151017-80"'),
            (b"accept-ranges", b"bytes")]  # fmt: skip
GRPC_RESPONSE = [(b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"date", b"Sun, 06 Dec 2026 07:34:47 GMT"),
                 (b"content-type", b"application/grpc")]  # fmt: skip
GRPC_REQUEST = [*REQUEST, (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                (b"x-forwarded-for", b"127.0.0.1")]  # fmt: skip
BATCH = 16
BIG_WINDOW = hf.window_update(0, (1 << 31) - 1 - 65535)


def prepare(n: int) -> tuple[list[bytes], list[bytes]]:
    """The peers' frames: n request HEADERS (server loop), n response HEADERS + DATA + trailers (client loop)."""
    enc = hpack.Encoder()
    requests = [hf.headers(sid, enc.encode(REQUEST)) for sid in range(1, 2 * n + 1, 2)]
    enc = hpack.Encoder()
    responses = [
        hf.headers(sid, enc.encode(GRPC_RESPONSE), end_stream=False)
        + hf.frame(hf.DATA, 0, sid, b"\x00" * 23)
        + hf.headers(sid, enc.encode([(b"grpc-status", b"0")]))
        for sid in range(1, 2 * n + 1, 2)
    ]
    return requests, responses


def server_loop(requests: list[bytes]) -> None:
    server = c.H2ServerCodec(1000, 1000, 1 << 20, 1 << 22)
    server.initiate_connection()
    server.receive_data(hf.client_preface({4: 1 << 30}) + BIG_WINDOW)
    server.data_to_send()
    body = b"planemesh bench " * 8
    for i in range(0, len(requests), BATCH):
        for event in server.receive_data(b"".join(requests[i : i + BATCH])):
            if type(event) is ev.RequestReceived:
                sid = event.stream_id
                server.send_headers(sid, RESPONSE)
                server.local_flow_control_window(sid)
                server.send_data(sid, body, end_stream=True)
        server.data_to_send()


def client_loop(responses: list[bytes]) -> None:
    client = c.H2ClientCodec(1000, 1000, 1 << 20, 1 << 22)
    client.initiate_connection()
    client.receive_data(hf.settings({3: 1 << 20, 4: 1 << 30}) + BIG_WINDOW)
    client.data_to_send()
    for i in range(0, len(responses), BATCH):
        for _ in range(BATCH):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, [*GRPC_REQUEST, (b"x-request-id", b"%032x" % sid)])
            client.local_flow_control_window(sid)
            client.send_data(sid, b"\x00\x00\x00\x00\x04\x0a\x02hi", end_stream=True)
        client.data_to_send()
        for event in client.receive_data(b"".join(responses[i : i + BATCH])):
            if type(event) is ev.DataReceived:
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        client.data_to_send()


def _instructions(side: str, frames: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
                *dev_module_argv("bench.h2_codec_cost", "--child", side, str(frames))]  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"the counted child failed:\n{out.stderr[-2000:]}")
    found = re.search(r"refs:\s*([\d,]+)", out.stderr)
    if found is None:
        raise RuntimeError(f"no callgrind count:\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        requests, responses = pickle.loads(Path(argv[2]).read_bytes())
        return server_loop(requests) if argv[1] == "server" else client_loop(responses)
    parser = argparse.ArgumentParser(prog="python -m bench h2_codec_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)
    n = args.requests
    with tempfile.TemporaryDirectory() as tmp:
        small, large = Path(tmp) / "n.pickle", Path(tmp) / "2n.pickle"
        small.write_bytes(pickle.dumps(prepare(n)))
        large.write_bytes(pickle.dumps(prepare(2 * n)))
        for side, what in (("server", "server side, h2 GET answered"), ("client", "client side, h2c gRPC call")):
            per = (_instructions(side, large) - _instructions(side, small)) / n
            print(f"h2 codec, {what}: {per / 1000:.1f}k instructions per request (callgrind, {n} requests)")


if __name__ == "__main__":
    main(sys.argv[1:])
