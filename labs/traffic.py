"""Real clients for labs: HTTP and TCP from inside a pod's namespace (demo, tests, benchmarks).

Each function runs in a thread that entered the pod's namespace (labs.netns.call_in), so its sockets are
the pod's own sockets.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from planemesh.labs.netns import call_in


def host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass
class HttpResult:
    status: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)

    def seen(self, i: int = 0) -> dict[str, Any]:
        return json.loads(self.bodies[i])

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latency_ms) if self.latency_ms else float("nan")


Headers = dict[str, str] | list[dict[str, str]] | None  # the same for every request, or one dict per request


def _exchange(conn: http.client.HTTPConnection, result: HttpResult, method: str, path: str,
              body: bytes | None, headers: dict[str, str]) -> None:  # fmt: skip
    started = time.perf_counter()
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    result.latency_ms.append((time.perf_counter() - started) * 1000)
    result.status.append(resp.status)
    result.bodies.append(data)
    result.headers.append({k.lower(): v for k, v in resp.getheaders()})


def _http_requests(
    address: str,
    port: int,
    paths: list[str],
    headers: Headers,
    timeout: float,
    method: str,
    body: bytes | None,
) -> HttpResult:
    result = HttpResult()
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        for i, path in enumerate(paths):  # one connection: keep-alive across all of them
            _exchange(conn, result, method, path, body, (headers[i] if isinstance(headers, list) else headers) or {})
    finally:
        conn.close()
    return result


def _http2_requests(
    address: str,
    port: int,
    paths: list[str],
    headers: Headers,
    timeout: float,
    method: str,
    body: bytes | None,
) -> HttpResult:
    """The requests one after the other, each a stream on one h2c (prior knowledge) connection."""
    import h2.config
    import h2.connection
    import h2.events

    result = HttpResult()
    sock = socket.create_connection((address, port), timeout=timeout)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    authority = host_port(address, port).encode()
    try:
        for i, path in enumerate(paths):
            extra = (headers[i] if isinstance(headers, list) else headers) or {}
            fields = [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"http"),
                      (b":authority", authority)]
            fields += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
            if body:
                fields.append((b"content-length", str(len(body)).encode()))
            started = time.perf_counter()
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, fields, end_stream=not body)
            if body:
                conn.send_data(sid, body, end_stream=True)  # small bodies: within the first window
            sock.sendall(conn.data_to_send())
            status, got, data, done = 0, {}, bytearray(), False
            while not done:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the connection closed")
                for event in conn.receive_data(chunk):
                    if getattr(event, "stream_id", sid) != sid:
                        continue
                    if isinstance(event, h2.events.ResponseReceived):
                        for n, v in event.headers:
                            if n == b":status":
                                status = int(v)
                            else:
                                got[n.decode().lower()] = v.decode()
                    elif isinstance(event, h2.events.DataReceived):
                        data += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, sid)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        done = True
                sock.sendall(conn.data_to_send())
            result.latency_ms.append((time.perf_counter() - started) * 1000)
            result.status.append(status)
            result.bodies.append(bytes(data))
            result.headers.append(got)
    finally:
        sock.close()
    return result


def http_requests(
    ns: str,
    address: str,
    port: int,
    paths: list[str],
    *,
    headers: Headers = None,
    timeout: float = 10.0,
    method: str = "GET",
    body: bytes | None = None,
    http2: bool = False,
) -> HttpResult:
    """Send requests over one keep-alive connection from inside `ns` (headers: one dict for all, or a list);
    http2: as streams of one h2c (prior knowledge) connection, one after the other."""
    fn = _http2_requests if http2 else _http_requests
    return call_in(ns, fn, address, port, paths, headers, timeout, method, body)


def _http_until(address: str, port: int, path: str, stop: threading.Event, pause_s: float,
                timeout: float) -> tuple[HttpResult, list[float]]:  # fmt: skip
    result, sent_at = HttpResult(), []
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        while not stop.is_set():
            sent_at.append(time.monotonic())
            _exchange(conn, result, "GET", f"{path}{len(sent_at)}", None, {})
            if pause_s:
                time.sleep(pause_s)
    finally:
        conn.close()
    return result, sent_at


def http_requests_until(
    ns: str, address: str, port: int, path: str, stop: threading.Event, *, pause_s: float = 0.0, timeout: float = 10.0
) -> tuple[HttpResult, list[float]]:
    """GET `path<n>` (n = 1, 2, ...) over one keep-alive connection until `stop` is set, `pause_s` apart;
    returns the results and each request's time.monotonic() send time. Run it in a thread."""
    return call_in(ns, _http_until, address, port, path, stop, pause_s, timeout)


@dataclass
class TcpResult:
    peer_seen_by_server: str
    echoed_ok: bool
    bytes_sent: int
    seconds: float


def _tcp_echo(address: str, port: int, size: int, timeout: float) -> TcpResult:
    payload = os.urandom(size)
    started = time.perf_counter()
    with socket.create_connection((address, port), timeout=timeout) as conn:
        banner = b""
        while not banner.endswith(b"\n"):
            chunk = conn.recv(1)
            if not chunk:
                break
            banner += chunk
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)  # half-close: the server echoes the rest, then closes
        digest, received = hashlib.sha256(), 0
        while data := conn.recv(65536):
            digest.update(data)
            received += len(data)
    peer = banner.decode().strip().removeprefix("peer ")
    ok = received == size and digest.digest() == hashlib.sha256(payload).digest()
    return TcpResult(peer, ok, size, time.perf_counter() - started)


def tcp_echo(ns: str, address: str, port: int, size: int = 1 << 20, timeout: float = 10.0) -> TcpResult:
    """Connect from inside `ns`, read the server's "peer ..." line, round-trip `size` random bytes."""
    return call_in(ns, _tcp_echo, address, port, size, timeout)


def wait_for_port(ns: str, address: str, port: int, timeout: float = 10.0) -> None:
    def probe() -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((address, port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    call_in(ns, probe)
