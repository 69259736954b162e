"""Upstream side: one HTTP/1.1 connection per in-flight request, pooled per (address, port, source, mark).

Every upstream socket carries SO_MARK (so the data path never re-intercepts the proxy's own traffic) and is
bound to the source address of the destination's plane when the caller knows one.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from planemesh.agent.proxy.http1 import (
    HOP_BY_HOP,
    KEEP_ALIVE_TOKEN,
    MAX_HEADER_BYTES,
    MAX_HEADERS_COUNT,
    connection_tokens,
    dropped_names,
)
from planemesh.agent.proxy.messages import ResponseHead
from planemesh.agent.proxy.sockets import open_upstream
from planemesh.agent.proxy.tls_context import originate_tls
from planemesh.model.tls_config import endpoint_tls

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import PoolUser, ResponseSink
    from planemesh.agent.proxy.contracts import Proxy as PlaneProxy

PoolKey = tuple[str, int, str | None, int]
# Idle connections above max_idle_per_key are closed once idle this long (not at once): many requests ending in
# one event-loop pass (h2 streams, a burst of clients) would otherwise close connections the next pass reopens.
SURPLUS_GRACE_S = 1.0
SURPLUS_FACTOR = 16  # ... but never more than max_idle_per_key * SURPLUS_FACTOR idle per key
_KEEP_ALIVE = [KEEP_ALIVE_TOKEN]  # a Connection header that names nothing but itself (most responses)


class _HeadResponseDone(Exception):
    """Raised from the parser callback: a response to HEAD has no body whatever its headers say
    (llhttp cannot be told so through httptools)."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "chunked",
        "conn_values",
        "exchange",
        "feeding",
        "head_done",
        "headers",
        "idle_since",
        "in_body",
        "key",
        "length",
        "nfields",
        "parser",
        "paused_ds",
        "phrase",
        "pool",
        "reading_paused",
        "ready",
        "reused",
        "section_bytes",
        "status",
        "trailers",
        "transport",
        "upgrade",
    )

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = HttpResponseParser(self)
        self.exchange: ResponseSink | None = None
        self.ready = False
        self.reused = False
        self.head_done = False
        self.reading_paused = False
        self.paused_ds = None
        self.idle_since = 0.0
        self.status = 0
        self.phrase = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.chunked = False
        self.conn_values: list[bytes] | None = None
        self.upgrade: bytes | None = None
        self.nfields = 0
        self.in_body = False  # headers complete: header callbacks now bring trailers
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.section_bytes = 0  # of the header section (or trailer section) being parsed
        self.feeding = False  # inside feed_data: the pool must not hand this connection out yet

    # ---- transport events ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ready = True
        stats = self.pool.proxy.stats
        stats.upstream_active += 1
        stats.upstream_total += 1

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:  # bytes on an idle connection: the server broke the protocol; never reuse it
            self.close()
            return
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:  # a 101 (checked by the exchange): the rest is the tunnel's
            offset = upgrade.args[0] if upgrade.args else len(data)
            ex.on_upstream_upgraded(self, data[offset:])
            if self.exchange is ex:  # not taken over by a tunnel
                self.close()
        except HttpParserError:
            if self.head_done:  # a response to HEAD: complete at the end of its head
                self.head_done = False
                self.parser = HttpResponseParser(self)
                ex.on_response_complete()
                end = data.find(b"\r\n\r\n")
                if end < 0 or end + 4 < len(data):  # a body nobody may send (or a head we cannot place): no reuse
                    self.close()
            else:  # malformed, too many header fields, a body where none can be, bytes nobody asked for
                ex.on_upstream_protocol_error()
                self.close()
        finally:
            self.feeding = False
        ex.ds.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ready:
            self.ready = False
            self.pool.proxy.stats.upstream_active -= 1
        self.pool.discard(self)
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.on_upstream_lost(self)
        if self.paused_ds is not None:
            self.paused_ds.resume_for_upstream()
            self.paused_ds = None

    def pause_writing(self) -> None:  # the upstream is slow to take the request body
        ex = self.exchange
        if ex is not None:
            self.paused_ds = ex.ds
            ex.ds.pause_for_upstream()

    def resume_writing(self) -> None:
        if self.paused_ds is not None:
            self.paused_ds.resume_for_upstream()
            self.paused_ds = None

    def pause_reading(self) -> None:  # the client is slow to take the response body
        if not self.reading_paused and self.ready:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.ready:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.exchange = None
        if self.ready:
            self.transport.close()

    # ---- httptools callbacks --------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.exchange is None:  # a response after the last one ended, in the same read: nobody asked for it
            raise HttpParserError("unsolicited response")
        self.section_bytes = 0
        self.headers = []
        self.phrase = b""
        self.length = None
        self.chunked = False
        self.conn_values = None
        self.upgrade = None
        self.nfields = 0
        self.in_body = False
        self.trailers = None

    def on_status(self, phrase: bytes) -> None:
        self.phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self.section_bytes = self.section_bytes + len(name) + len(value) + 4
        nfields = self.nfields = self.nfields + 1
        if nfields > MAX_HEADERS_COUNT or size > MAX_HEADER_BYTES or self.in_body:
            self._unusual_field(name.lower(), value, size)
            return
        n = name.lower()
        if n not in HOP_BY_HOP:  # the head's fields are end-to-end (messages.ResponseHead); framing is ours
            self.headers.append((n, value))
        elif n == b"content-length":
            self.length = int(value)  # llhttp has validated it
        elif n == b"transfer-encoding":
            self.chunked = value.rstrip().lower().endswith(b"chunked")
        elif n == b"connection":
            if self.conn_values is None:
                self.conn_values = [value]
            else:
                self.conn_values.append(value)
        elif n == b"upgrade" and self.upgrade is None:
            self.upgrade = value

    def _unusual_field(self, n: bytes, value: bytes, size: int) -> None:
        """A trailer, or a field past the head's limits (answered as an upstream protocol error)."""
        if size > MAX_HEADER_BYTES:
            raise HttpParserError("response header section too large")
        if self.in_body:
            self._on_trailer(n, value)
            return
        raise HttpParserError("too many response header fields")

    def _on_trailer(self, name: bytes, value: bytes) -> None:
        if self.trailers is None:
            self.trailers = [(name, value)]
        elif len(self.trailers) >= MAX_HEADERS_COUNT:
            raise HttpParserError("too many trailer fields")
        else:
            self.trailers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_body = True
        self.section_bytes = 0
        ex = self.exchange
        if ex is None:
            return
        status = self.status = self.parser.get_status_code()
        if (status == 204 and (self.length or self.chunked)) or (status == 304 and self.chunked):
            # RFC 9110 8.6, 9112 6.1: these never have a body; framing that says otherwise would leave bytes
            # to be read as the next response (Envoy: 502, as here).
            raise HttpParserError("body framing on a 204/304 response")
        # The response head, codec-neutral: what the Connection header named is gone too, and a 101's protocol is
        # kept only when it really switches (an Upgrade and `Connection: upgrade`, what llhttp stops on).
        fields = self.headers
        conn_values = self.conn_values
        upgrade = None
        if conn_values is not None:
            named = HOP_BY_HOP if conn_values == _KEEP_ALIVE else dropped_names(conn_values)
            if named is not HOP_BY_HOP:
                fields = [(n, v) for n, v in fields if n not in named]
            if self.upgrade is not None and any(b"upgrade" in connection_tokens(v) for v in conn_values):
                upgrade = self.upgrade
        until_close = self.length is None and not self.chunked
        keep_alive = self.parser.should_keep_alive()
        ex.on_response_head(ResponseHead(status, fields, self.length, until_close, keep_alive, self.phrase, upgrade))
        if ex.is_head and status >= 200:
            self.head_done = True
            raise _HeadResponseDone

    def on_body(self, data: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            ex.on_response_body(data)

    def on_message_complete(self) -> None:
        ex = self.exchange
        if ex is None or self.status < 200:
            return  # interim responses were relayed in on_response_head; a 101 becomes a tunnel
        if self.trailers is not None:
            ex.on_response_trailers(self.trailers)
        ex.on_response_complete()


class UpstreamPool:
    """Idle keep-alive connections per (address, port, source, mark); connects on a miss. The most recently
    idle connection is reused first, so the surplus above max_idle_per_key ages and is closed by sweep()."""

    def __init__(self, proxy: PlaneProxy, max_idle_per_key: int = 64, idle_timeout_s: float = 60.0) -> None:
        self.proxy = proxy
        self.max_idle_per_key = max_idle_per_key
        self.idle_timeout_s = idle_timeout_s
        self.idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self.connecting: set[asyncio.Task] = set()
        self._keys: dict[tuple[str, int], tuple[PoolKey, str]] = {}

    def key_for(self, addr: tuple[str, int]) -> tuple[PoolKey, str]:
        """(pool key, "host:port" for the access log), memoised per destination until forget_keys()."""
        found = self._keys.get(addr)
        if found is None:
            source, mark = self.proxy.upstream_binding(addr[0])
            host, port = addr
            found = (
                (host, port, source, mark),
                f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            )
            if len(self._keys) < 65536:
                self._keys[addr] = found
        return found

    def forget_keys(self) -> None:
        """Source addresses may have changed (new snapshot): compute keys afresh."""
        self._keys.clear()

    def acquire_for(self, ex: PoolUser, addr: tuple[str, int], connect_timeout: float) -> None:
        key, ex.upstream_host = self._keys.get(addr) or self.key_for(addr)
        cluster = ex.cluster
        if (cluster is not None and (cluster.tls is not None or cluster.tls_matches)  # a plaintext cluster: no call
                and (tls := endpoint_tls(cluster, ex.endpoint, addr)) is not None):
            key = (*key, tls)  # TLS origination (agent/proxy/tls_context.py): its own connections
        ex.upstream_key = key
        idle = self.idle.get(key)
        i = len(idle) - 1 if idle else -1
        while i >= 0:
            conn = idle[i]
            i -= 1
            if conn.feeding:  # released while its parser still runs: bytes after its response may follow
                continue
            del idle[i + 1]
            if conn.ready:
                conn.reused = True
                ex.on_connected(conn)
                return
        self.connect_for(ex, addr, connect_timeout)

    def connect_for(self, ex: PoolUser, addr: tuple[str, int], connect_timeout: float) -> None:
        proxy = self.proxy
        stats = proxy.stats
        if stats.requests_pending >= proxy.sla.max_pending_requests:
            ex.overloaded(b"pending")
            ex.ds.flush()
            return
        key, ex.upstream_host = self.key_for(addr)
        cluster = ex.cluster
        if (cluster is not None and (cluster.tls is not None or cluster.tls_matches)  # a plaintext cluster: no call
                and (tls := endpoint_tls(cluster, ex.endpoint, addr)) is not None):
            key = (*key, tls)
        ex.upstream_key = key
        if not ex.pending:
            ex.pending = True
            stats.requests_pending += 1
        task = proxy.loop.create_task(self._open(key, connect_timeout))
        ex.connect_task = task
        self.connecting.add(task)
        task.add_done_callback(functools.partial(self._opened, ex))

    async def _open(self, key: PoolKey, timeout: float) -> UpstreamConnection:
        host, port, source, mark = key[:4]
        sock = await open_upstream(host, port, mark=mark, source=source, timeout=timeout)
        if len(key) > 4:  # TLS origination: handshake, then the peer's SANs (agent/proxy/tls.py)
            return await originate_tls(self.proxy, sock, key[4], lambda: UpstreamConnection(self, key), timeout)
        try:
            _, conn = await self.proxy.loop.create_connection(lambda: UpstreamConnection(self, key), sock=sock)
        except BaseException:
            sock.close()
            raise
        return conn  # type: ignore[return-value]

    def _opened(self, ex: PoolUser, task: asyncio.Task) -> None:
        self.connecting.discard(task)
        if ex.pending and ex.connect_task is task:
            ex.pending = False
            self.proxy.stats.requests_pending -= 1
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            if not ex.finished and ex.connect_task is task:
                ex.connect_task = None
                ex.on_connect_failed(isinstance(exc, TimeoutError))
            return
        conn: UpstreamConnection = task.result()
        if ex.finished or ex.connect_task is not task:
            self.release(conn)  # the request went away meanwhile: keep the fresh connection
            return
        ex.connect_task = None
        ex.on_connected(conn)

    def release(self, conn: UpstreamConnection) -> None:
        conn.exchange = None
        if not conn.ready:
            return
        if conn.reading_paused:
            conn.resume_reading()
        idle = self.idle.get(conn.key)
        if idle is None:
            idle = self.idle[conn.key] = []
        if len(idle) >= self.max_idle_per_key * SURPLUS_FACTOR or self.proxy.draining:
            conn.close()
            return
        conn.idle_since = self.proxy.loop.time()
        idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def sweep(self) -> None:
        """Close connections idle longer than the idle timeout, and the surplus above max_idle_per_key idle
        longer than SURPLUS_GRACE_S (called from the proxy's periodic timer)."""
        now = self.proxy.loop.time()
        deadline = now - self.idle_timeout_s
        surplus_deadline = now - SURPLUS_GRACE_S
        keep = self.max_idle_per_key
        for key, idle in list(self.idle.items()):
            while idle and (
                idle[0].idle_since < deadline or (len(idle) > keep and idle[0].idle_since < surplus_deadline)
            ):
                idle.pop(0).close()
            if not idle:
                del self.idle[key]

    def close_all(self) -> None:
        for idle in self.idle.values():
            for conn in idle:
                conn.close()
        self.idle.clear()
        for task in list(self.connecting):
            task.cancel()
