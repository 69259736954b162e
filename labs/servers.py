"""Real servers the labs run inside pod namespaces (demo, tests, benchmarks).

    python -m planemesh.labs.servers http --port 80 [--port 8080]
    python -m planemesh.labs.servers http --port 8081=v1 --port 8082=v2   # one name (version tag) per port
    python -m planemesh.labs.servers tcp --port 9000

HTTP (HTTP/1.1, keep-alive, dual-stack): `GET /anything` answers JSON with what the server saw (peer
address, local address and port, headers, server name); `GET /big?size=N` streams N bytes chunked (byte i
is i % 251); `POST /sha256` answers the SHA-256 of the request body; `GET /status/N` answers status N;
`GET /delay/MS` answers after MS milliseconds; `GET /flaky/KEY/N[?status=S&delay=MS]`: the first N requests
for KEY answer S (default 503) after MS ms, later ones 200 at once ("attempt" counts them).
Per port, for tests: `GET /_lab/fail/S` makes every other request answer S until `GET /_lab/ok`;
`GET /_lab/log` lists the requests seen (method, path, host, x-request-id), `GET /_lab/clear` empties it.
TCP: sends "peer <address>\n", then echoes until EOF.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PATTERN = bytes(i % 251 for i in range(251 * 256))


def pattern_bytes(size: int) -> bytes:
    """The bytes /big?size=N sends, for clients that check them."""
    reps = size // len(PATTERN) + 1
    return (PATTERN * reps)[:size]


class PortState:
    """What one HTTP port remembers: its name, an injected failure, flaky counters, the requests seen."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fail_status: int | None = None
        self.lock = threading.Lock()
        self.flaky: dict[str, int] = {}
        self.log: collections.deque[dict] = collections.deque(maxlen=10_000)

    def attempt(self, key: str) -> int:
        with self.lock:
            self.flaky[key] = self.flaky.get(key, 0) + 1
            return self.flaky[key]


class DualStackHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 1024
    state: PortState

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "planemesh-lab"
    # One write per response and no Nagle: unbuffered header/body writes meet delayed ACKs as 40 ms stalls.
    wbufsize = -1
    disable_nagle_algorithm = True
    name = os.environ.get("PM_SERVER_NAME", "server")

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read responses, not logs
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    @property
    def state(self) -> PortState:
        return self.server.state  # type: ignore[attr-defined]

    def _seen(self, **extra: object) -> bytes:
        local = self.connection.getsockname()
        seen = {
            "server": self.state.name or self.name,
            "peer": self.client_address[0].removeprefix("::ffff:"),
            "local": local[0].removeprefix("::ffff:"),
            "port": local[1],
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            **extra,
        }
        return json.dumps(seen).encode()

    def _lab(self, path: str) -> None:
        """The per-port test controls under /_lab/ (never logged, never failed)."""
        state = self.state
        if path.startswith("/_lab/fail/"):
            state.fail_status = int(path.rsplit("/", 1)[1])
        elif path == "/_lab/ok":
            state.fail_status = None
        elif path == "/_lab/clear":
            state.log.clear()
        elif path == "/_lab/log":
            self._send(200, json.dumps(list(state.log)).encode())
            return
        self._send(200, json.dumps({"server": state.name, "fail_status": state.fail_status}).encode())

    def _flaky(self, url) -> None:
        _, _, key, failures = url.path.split("/", 4)[:4]
        query = parse_qs(url.query)
        attempt = self.state.attempt(key)
        if attempt <= int(failures):
            time.sleep(int(query.get("delay", ["0"])[0]) / 1000)
            self._send(int(query.get("status", ["503"])[0]), self._seen(attempt=attempt))
        else:
            self._send(200, self._seen(attempt=attempt))

    def _before(self, url) -> bool:
        """Lab controls, request log and injected failure; True when the request was answered here."""
        if url.path.startswith("/_lab/"):
            self._lab(url.path)
            return True
        state = self.state
        state.log.append({"method": self.command, "path": self.path, "host": self.headers.get("host"),
                          "request_id": self.headers.get("x-request-id")})  # fmt: skip
        if state.fail_status is not None:
            self._send(state.fail_status, self._seen())
            return True
        return False

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if self._before(url):
            return
        if url.path.startswith("/flaky/") and url.path.count("/") == 3:
            self._flaky(url)
            return
        if url.path == "/big":
            size = int(parse_qs(url.query).get("size", ["1048576"])[0])
            self.send_response(200)
            self.send_header("content-type", "application/octet-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            data = pattern_bytes(size)
            for i in range(0, size, 65536):
                chunk = data[i : i + 65536]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
            return
        if url.path.startswith("/status/"):
            self._send(int(url.path.rsplit("/", 1)[1]), self._seen())
            return
        if url.path.startswith("/delay/"):
            time.sleep(int(url.path.rsplit("/", 1)[1]) / 1000)
        self._send(200, self._seen())

    do_HEAD = do_GET

    def do_POST(self) -> None:
        if self._before(urlsplit(self.path)):
            self._discard_body()
            return
        digest = hashlib.sha256()
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                digest.update(self.rfile.read(size))
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("content-length", "0"))
            while remaining:
                chunk = self.rfile.read(min(remaining, 65536))
                if not chunk:
                    break
                digest.update(chunk)
                remaining -= len(chunk)
        self._send(200, json.dumps({"sha256": digest.hexdigest(), "server": self.state.name or self.name}).encode())

    def _discard_body(self) -> None:
        remaining = int(self.headers.get("content-length", "0"))
        while remaining > 0 and (chunk := self.rfile.read(min(remaining, 65536))):
            remaining -= len(chunk)


class TcpEchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.sendall(f"peer {self.client_address[0].removeprefix('::ffff:')}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)


class DualStackTCPServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def port_spec(text: str) -> tuple[int, str]:
    """`8081` or `8081=v1` (a name per port: the version tag its answers carry)."""
    port, _, name = text.partition("=")
    return int(port), name


def serve(kind: str, ports: list[tuple[int, str]]) -> None:
    servers: list[socketserver.TCPServer] = []
    for port, name in ports:
        if kind == "http":
            http = DualStackHTTPServer(("::", port), EchoHandler)
            http.state = PortState(name)
            servers.append(http)
        else:
            servers.append(DualStackTCPServer(("::", port), TcpEchoHandler))
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    print(f"ready {kind} {' '.join(str(p) for p, _ in ports)}", flush=True)
    for t in threads:
        t.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["http", "tcp"])
    parser.add_argument("--port", type=port_spec, action="append", required=True, help="PORT or PORT=NAME")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    if args.name:
        EchoHandler.name = args.name
    serve(args.kind, args.port)


if __name__ == "__main__":
    main()
