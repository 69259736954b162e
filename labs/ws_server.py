"""A minimal RFC 6455 WebSocket echo server and blocking client for labs and tests (no third-party library).

    python -m planemesh.labs.ws_server --port 8080 [--port 8081]

Server: `GET <path>` with `Connection: upgrade` + `Upgrade: websocket` and a Sec-WebSocket-Key is answered 101
(Sec-WebSocket-Accept), then every message is echoed with its opcode (fragmented messages reassembled), pings
get pongs, a client's close is answered with the same code. The text message "close-please" makes the server
start the close handshake itself (1000 "bye"). `GET /refuse` answers 403 without switching; other requests
without an upgrade get `200 plain <path>` (keep-alive). Every handshake's request headers are kept in
`seen` (and printed as a JSON line by the CLI), so tests can check what the proxy added.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import socketserver
import struct
import sys
import threading
from dataclasses import dataclass

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_HEAD = 64 * 1024


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def encode_frame(opcode: int, payload: bytes, *, mask: bool, fin: bool = True) -> bytes:
    """One frame; clients mask (RFC 6455 5.3), servers do not."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + _xor(payload, key)


def _xor(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    whole = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(whole, "big")).to_bytes(len(data), "big")


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes


class FrameParser:
    """Sans-IO: feed() bytes, get the complete frames they finish (unmasked)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self.buf += data
        frames = []
        while True:
            frame = self._one()
            if frame is None:
                return frames
            frames.append(frame)

    def _one(self) -> Frame | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        if buf[0] & 0x70:
            raise ValueError("reserved bits set")
        fin, opcode = bool(buf[0] & 0x80), buf[0] & 0x0F
        masked, n = bool(buf[1] & 0x80), buf[1] & 0x7F
        pos = 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, pos = struct.unpack_from("!H", buf, 2)[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, pos = struct.unpack_from("!Q", buf, 2)[0], 10
        key = b""
        if masked:
            if len(buf) < pos + 4:
                return None
            key, pos = bytes(buf[pos : pos + 4]), pos + 4
        if len(buf) < pos + n:
            return None
        payload = bytes(buf[pos : pos + n])
        del buf[: pos + n]
        return Frame(fin, opcode, _xor(payload, key) if masked else payload)


class Messages:
    """Frames -> messages: data frames reassembled, control frames (close, ping, pong) passed through."""

    def __init__(self) -> None:
        self.parser = FrameParser()
        self.opcode = 0
        self.parts: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        out = []
        for frame in self.parser.feed(data):
            if frame.opcode >= CLOSE:
                out.append((frame.opcode, frame.payload))
                continue
            if frame.opcode != CONT:
                self.opcode = frame.opcode
            self.parts.append(frame.payload)
            if frame.fin:
                out.append((self.opcode, b"".join(self.parts)))
                self.parts = []
        return out


def read_head(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    """(the HTTP head up to its blank line, the bytes after it); b"" head when the peer closed first."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            raise ValueError("head too large")
        data = sock.recv(65536)
        if not data:
            return b"", buf
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """(first line, lower-case header name -> value) of an HTTP head."""
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


# ---- server -------------------------------------------------------------------------------------------


class _Handler(socketserver.BaseRequestHandler):
    server: WebSocketServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rest = b""
        try:
            while True:
                head, rest = read_head(sock, rest)
                if not head:
                    return
                line, headers = parse_head(head)
                path = line.split(" ")[1] if line.count(" ") >= 2 else "/"
                wants_ws = "upgrade" in headers.get("connection", "").lower() and (
                    headers.get("upgrade", "").lower() == "websocket"
                )
                if path == "/refuse":
                    _respond(sock, 403, b"refused\n")
                elif wants_ws and "sec-websocket-key" in headers:
                    self.server.record(path, headers)
                    key = headers["sec-websocket-key"].encode()
                    sock.sendall(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
                    )
                    self._echo(sock, rest)
                    return
                else:
                    _respond(sock, 200, f"plain {path}\n".encode())
        except (OSError, ValueError):
            return

    def _echo(self, sock: socket.socket, rest: bytes) -> None:
        messages = Messages()
        pending = messages.feed(rest)
        while True:
            for opcode, payload in pending:
                if opcode == CLOSE:
                    sock.sendall(encode_frame(CLOSE, payload[:2], mask=False))
                    sock.shutdown(socket.SHUT_WR)
                    _drain(sock)
                    return
                if opcode == PING:
                    sock.sendall(encode_frame(PONG, payload, mask=False))
                elif opcode == TEXT and payload == b"close-please":
                    sock.sendall(encode_frame(CLOSE, struct.pack("!H", 1000) + b"bye", mask=False))
                    # The client answers with its close frame; then the server closes the TCP connection.
                    for reply, _ in _read_messages(sock, messages):
                        if reply == CLOSE:
                            sock.shutdown(socket.SHUT_WR)
                            _drain(sock)
                            return
                    return
                elif opcode in (TEXT, BINARY):
                    sock.sendall(encode_frame(opcode, payload, mask=False))
            data = sock.recv(1 << 20)
            if not data:
                return
            pending = messages.feed(data)


def _read_messages(sock: socket.socket, messages: Messages):
    while True:
        data = sock.recv(65536)
        if not data:
            return
        yield from messages.feed(data)


def _drain(sock: socket.socket) -> None:
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def _respond(sock: socket.socket, status: int, body: bytes) -> None:
    reason = {200: b"OK", 403: b"Forbidden"}[status]
    sock.sendall(b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n\r\n%s" % (status, reason, len(body), body))


class WebSocketServer(socketserver.ThreadingTCPServer):
    """Serves in a thread while inside `with` (tests), or forever (the CLI)."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler, bind_and_activate=False)
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.server_bind()
        self.server_activate()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.verbose = False

    @property
    def port(self) -> int:
        return self.server_address[1]

    def record(self, path: str, headers: dict[str, str]) -> None:
        with self.lock:
            self.seen.append((path, headers))
        if self.verbose:
            print(json.dumps({"path": path, "headers": headers}), flush=True)

    def __enter__(self) -> WebSocketServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


# ---- client ---------------------------------------------------------------------------------------------


class WebSocketClient:
    """A blocking client on a connected socket: handshake(), send(), recv(), close()."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.messages = Messages()
        self.pending: list[tuple[int, bytes]] = []

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 10.0) -> WebSocketClient:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def handshake(self, authority: str, path: str = "/") -> tuple[int, dict[str, str], bytes]:
        """Send the opening handshake; returns (status, headers, body of a non-101 answer).
        A 101 must carry the right Sec-WebSocket-Accept (ValueError otherwise)."""
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n".encode()
            + b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )  # fmt: skip
        head, rest = read_head(self.sock)
        line, headers = parse_head(head)
        status = int(line.split(" ")[1])
        if status != 101:
            body = rest
            while len(body) < int(headers.get("content-length", "0")):
                body += self.sock.recv(65536)
            return status, headers, body
        if headers.get("sec-websocket-accept", "").encode() != accept_key(key):
            raise ValueError(f"bad Sec-WebSocket-Accept in {headers}")
        self.pending = self.messages.feed(rest)
        return status, headers, b""

    def send(self, payload: bytes | str, fragment: int = 0, opcode: int | None = None) -> None:
        """A text (str) or binary (bytes) message, in fragments of `fragment` bytes when > 0."""
        data = payload.encode() if isinstance(payload, str) else payload
        op = opcode if opcode is not None else (TEXT if isinstance(payload, str) else BINARY)
        if not fragment or len(data) <= fragment:
            self.sock.sendall(encode_frame(op, data, mask=True))
            return
        pieces = [data[i : i + fragment] for i in range(0, len(data), fragment)]
        for i, piece in enumerate(pieces):
            self.sock.sendall(encode_frame(op if i == 0 else CONT, piece, mask=True, fin=i == len(pieces) - 1))

    def recv(self) -> tuple[int, bytes]:
        """The next message or control frame: (opcode, payload); (CLOSE, b"") when the connection ended."""
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                return CLOSE, b""
            self.pending = self.messages.feed(data)
        return self.pending.pop(0)

    def close(self, code: int = 1000, reason: bytes = b"") -> tuple[int, bytes]:
        """The client's close handshake: (code, reason) of the server's close frame."""
        self.sock.sendall(encode_frame(CLOSE, struct.pack("!H", code) + reason, mask=True))
        opcode, payload = self.recv()
        while opcode != CLOSE:
            opcode, payload = self.recv()
        return close_status(payload)

    def ended(self) -> bool:
        """Whether the peer closed the TCP connection (reads EOF)."""
        return self.sock.recv(65536) == b""


def close_status(payload: bytes) -> tuple[int, bytes]:
    return (struct.unpack("!H", payload[:2])[0], payload[2:]) if len(payload) >= 2 else (1005, b"")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--host", default="::")
    args = parser.parse_args()
    servers = [WebSocketServer(args.host, port) for port in args.port]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for server in servers:
        server.verbose = True
    print("ready", flush=True)
    try:
        servers[0].serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
