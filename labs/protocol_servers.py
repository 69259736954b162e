"""Lab servers that are not HTTP, and their clients: what the sniffing listener must pass through untouched
(tests/netns/test_sniff_lab.py, bench/sniff.py).

    python -m planemesh.labs.protocol_servers --tls 4443:cert.pem:key.pem --banner 2525 --reverse 7000 --bulk 7001

All listeners are dual-stack ([::]) in one process, one thread per connection; "ready" is printed once all
are bound. Protocols:
- tls: TLS with the given certificate (ALPN h2/http/1.1 offered), then echo until the client's EOF.
- banner: server-first, like SMTP: BANNER on connect, `250 <line>` per line, `221 bye` after the client's
  half-close, then close.
- reverse: binary; reads until the client's half-close, answers sha256(data) + data reversed.
- bulk: a 10-byte request `\\0` + op + size (8 bytes, big-endian). `U`: the client uploads until EOF, the
  server answers sha256 (32 bytes) + byte count (8). `D`: the server sends `size` bytes, then their sha256.
  Lower-case `u`/`d` skip the hashing (throughput benchmarks). The first byte is 0: sniffed as opaque at once.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from planemesh.agent.proxy.sockets import make_listener_socket

BANNER = b"220 planemesh-lab ESMTP ready\r\n"
BLOCK = 1 << 20
_BULK_HEAD = struct.Struct("!cc Q")
IO_TIMEOUT_S = 60.0


# ---- certificates -----------------------------------------------------------------------------------


def self_signed_cert(directory: Path, name: str, *extra_names: str) -> tuple[Path, Path, bytes]:
    """A self-signed EC certificate for `name` (and `extra_names`, e.g. `*.example.test`) in `directory`:
    (cert.pem, key.pem, the certificate's DER bytes, which is what a client sees as getpeercert(True))."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in (name, *extra_names)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path, cert.public_bytes(serialization.Encoding.DER)


# ---- servers ---------------------------------------------------------------------------------------------


def _recv_until_eof(conn: socket.socket, sink: Callable[[memoryview], None]) -> int:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = 0
    while n := conn.recv_into(buf):
        sink(view[:n])
        total += n
    return total


def serve_tls(conn: socket.socket, ctx: ssl.SSLContext) -> None:
    with ctx.wrap_socket(conn, server_side=True) as tls:
        while data := tls.recv(65536):
            tls.sendall(data)


def serve_banner(conn: socket.socket) -> None:
    conn.sendall(BANNER)
    with conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(b"250 " + line)
    conn.sendall(b"221 bye\r\n")  # after the client's half-close: the other direction still works


def serve_reverse(conn: socket.socket) -> None:
    data = bytearray()
    _recv_until_eof(conn, data.extend)
    conn.sendall(hashlib.sha256(data).digest() + data[::-1])


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed early")
        out += chunk
    return out


def serve_bulk(conn: socket.socket) -> None:
    _zero, op, size = _BULK_HEAD.unpack(_recv_exact(conn, _BULK_HEAD.size))
    hashed = op in (b"U", b"D")
    digest = hashlib.sha256()
    if op in (b"U", b"u"):
        count = _recv_until_eof(conn, digest.update if hashed else lambda _view: None)
        conn.sendall(digest.digest() + count.to_bytes(8, "big"))
    elif op in (b"D", b"d"):
        _send_blocks(conn, size, digest if hashed else None)
        conn.sendall(digest.digest())


def _send_blocks(conn: socket.socket, size: int, digest: hashlib._Hash | None) -> None:
    """`size` bytes of one random block repeated, hashed into `digest` on the way when given."""
    block = memoryview(os.urandom(BLOCK))
    left = size
    while left:
        part = block[: min(left, BLOCK)]
        if digest is not None:
            digest.update(part)
        conn.sendall(part)
        left -= len(part)


def _listen(port: int) -> socket.socket:
    sock = make_listener_socket(port, transparent=False, backlog=1024)
    sock.setblocking(True)
    return sock


def _accept_loop(sock: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    def run(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError, ValueError, ConnectionError, ssl.SSLError):
            conn.settimeout(IO_TIMEOUT_S)
            handler(conn)

    while True:
        conn, _ = sock.accept()
        threading.Thread(target=run, args=(conn,), daemon=True).start()


def tls_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def serve(handlers: list[tuple[int, Callable[[socket.socket], None]]]) -> None:
    sockets = [(_listen(port), handler) for port, handler in handlers]
    threads = [threading.Thread(target=_accept_loop, args=pair, daemon=True) for pair in sockets]
    for t in threads:
        t.start()
    print(f"ready {' '.join(str(port) for port, _ in handlers)}", flush=True)
    for t in threads:
        t.join()


# ---- clients (run them in the client pod with labs.netns.call_in) -----------------------------------------


@dataclass
class TlsResult:
    peer_cert: bytes  # DER
    alpn: str | None
    reply: bytes


def tls_exchange(
    address: str, port: int, sni: str, cafile: str | Path, payload: bytes = b"ping", timeout: float = 10.0
) -> TlsResult:
    """A verifying TLS client: only the holder of a certificate in `cafile` for `sni` gets through."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection((address, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        tls.sendall(payload)
        reply = b""
        while len(reply) < len(payload) and (chunk := tls.recv(65536)):
            reply += chunk
        return TlsResult(tls.getpeercert(binary_form=True) or b"", tls.selected_alpn_protocol(), reply)


def banner_session(address: str, port: int, lines: list[bytes], timeout: float = 10.0) -> tuple[bytes, bytes]:
    """(what the server said before we said anything, everything after: answers and goodbye)."""
    with socket.create_connection((address, port), timeout=timeout) as conn:
        banner = b""
        while not banner.endswith(b"\n"):
            chunk = conn.recv(100)
            if not chunk:
                break
            banner += chunk
        for line in lines:
            conn.sendall(line)
        conn.shutdown(socket.SHUT_WR)
        rest = bytearray()
        _recv_until_eof(conn, rest.extend)
    return banner, bytes(rest)


def reverse_exchange(address: str, port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection((address, port), timeout=timeout) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        reply = bytearray()
        _recv_until_eof(conn, reply.extend)
    return bytes(reply)


@dataclass
class BulkResult:
    size: int  # bytes asked for
    transferred: int  # bytes the receiving end counted
    seconds: float  # from the request to the last byte (an upload: to the server's answer)
    local_digest: bytes  # sha256 computed here (sent or received bytes)
    remote_digest: bytes  # sha256 computed by the server

    @property
    def gbit_s(self) -> float:
        return self.transferred * 8 / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def intact(self) -> bool:
        return self.transferred == self.size and self.local_digest == self.remote_digest


def bulk_upload(
    address: str, port: int, size: int, *, hashed: bool = True, timeout: float = IO_TIMEOUT_S
) -> BulkResult:
    digest = hashlib.sha256()
    with socket.create_connection((address, port), timeout=timeout) as conn:
        started = time.perf_counter()
        conn.sendall(_BULK_HEAD.pack(b"\0", b"U" if hashed else b"u", size))
        _send_blocks(conn, size, digest if hashed else None)
        conn.shutdown(socket.SHUT_WR)
        answer = _recv_exact(conn, 40)
        seconds = time.perf_counter() - started
    return BulkResult(size, int.from_bytes(answer[32:], "big"), seconds, digest.digest(), answer[:32])


def bulk_download(
    address: str, port: int, size: int, *, hashed: bool = True, timeout: float = IO_TIMEOUT_S
) -> BulkResult:
    digest = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with socket.create_connection((address, port), timeout=timeout) as conn:
        started = time.perf_counter()
        conn.sendall(_BULK_HEAD.pack(b"\0", b"D" if hashed else b"d", size))
        left = size
        while left:
            n = conn.recv_into(buf, min(left, BLOCK))
            if not n:
                raise ConnectionError(f"closed with {left} bytes to go")
            if hashed:
                digest.update(view[:n])
            left -= n
        seconds = time.perf_counter() - started
        theirs = _recv_exact(conn, 32)
    return BulkResult(size, size - left, seconds, digest.digest(), theirs)


# ---- command line --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="protocol_servers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tls", action="append", default=[], metavar="PORT:CERT:KEY")
    parser.add_argument("--banner", action="append", default=[], type=int, metavar="PORT")
    parser.add_argument("--reverse", action="append", default=[], type=int, metavar="PORT")
    parser.add_argument("--bulk", action="append", default=[], type=int, metavar="PORT")
    args = parser.parse_args(argv)
    handlers: list[tuple[int, Callable[[socket.socket], None]]] = []
    for spec in args.tls:
        port, cert, key = spec.split(":", 2)
        ctx = tls_context(cert, key)
        handlers.append((int(port), lambda conn, ctx=ctx: serve_tls(conn, ctx)))
    handlers += [(p, serve_banner) for p in args.banner]
    handlers += [(p, serve_reverse) for p in args.reverse]
    handlers += [(p, serve_bulk) for p in args.bulk]
    if not handlers:
        parser.error("nothing to serve")
    serve(handlers)


if __name__ == "__main__":
    main()
