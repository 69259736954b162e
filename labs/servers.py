"""Real servers the labs run inside pod namespaces (demo, tests, benchmarks).

    python -m planemesh.labs.servers http --port 80 [--port 8080]
    python -m planemesh.labs.servers tcp --port 9000

HTTP (HTTP/1.1, keep-alive, dual-stack): `GET /anything` answers JSON with what the server saw (peer
address, headers, server name); `GET /big?size=N` streams N bytes chunked (byte i is i % 251);
`POST /sha256` answers the SHA-256 of the request body; `GET /status/N` answers status N;
`GET /delay/MS` answers after MS milliseconds. TCP: sends "peer <address>\n", then echoes until EOF.
"""

from __future__ import annotations

import argparse
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


class DualStackHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 1024

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

    def _seen(self) -> bytes:
        seen = {
            "server": self.name,
            "peer": self.client_address[0].removeprefix("::ffff:"),
            "local": self.connection.getsockname()[0].removeprefix("::ffff:"),
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        return json.dumps(seen).encode()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
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
        self._send(200, json.dumps({"sha256": digest.hexdigest(), "server": self.name}).encode())


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


def serve(kind: str, ports: list[int]) -> None:
    servers = [
        DualStackHTTPServer(("::", p), EchoHandler) if kind == "http" else DualStackTCPServer(("::", p), TcpEchoHandler)
        for p in ports
    ]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    print(f"ready {kind} {' '.join(map(str, ports))}", flush=True)
    for t in threads:
        t.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["http", "tcp"])
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    if args.name:
        EchoHandler.name = args.name
    serve(args.kind, args.port)


if __name__ == "__main__":
    main()
