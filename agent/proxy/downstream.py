"""Downstream side: one asyncio Protocol per accepted client connection, parsing requests with httptools.

Requests on a connection are answered in order; pipelined requests are parsed and queued (reading paused)
until the one in front has finished. Back-pressure both ways goes through pause/resume_reading.
An upgrade request (Connection: upgrade) or CONNECT stops the parser: what the client sends next is held
until the exchange knows whether the connection becomes a tunnel (tunnel.py) or stays HTTP.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import TYPE_CHECKING

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from planemesh.agent.proxy import accesslog
from planemesh.agent.proxy.exchange import Exchange
from planemesh.agent.proxy.http1 import (
    BAD_REQUEST,
    HEADERS_TOO_LARGE,
    MAX_HEADER_BYTES,
    MAX_HEADERS_COUNT,
    VERSION_NOT_SUPPORTED,
    connection_tokens,
    local_reply,
    parse_authority,
)
from planemesh.agent.proxy.limits import H1_REFUSALS
from planemesh.agent.proxy.request_checks import Refused, check_expect, check_head, check_host
from planemesh.agent.proxy.tunnel import TUNNEL_CONNECT, TUNNEL_UPGRADE

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import Proxy as PlaneProxy
    from planemesh.agent.proxy.routing import CompiledRouteConfig
    from planemesh.agent.proxy.routing_table import RoutingTable

PAUSE_PIPELINE = 1  # a later request waits for the one in front
PAUSE_UPSTREAM = 2  # the upstream is not taking the request body fast enough
PAUSE_BUFFER = 4  # the request body is buffered while the upstream connection is being opened
PAUSE_HELD = 8  # bytes after an upgrade/CONNECT request are held until it is known whether they tunnel
PAUSE_ERROR = 16  # malformed input after well-formed pipelined requests: those are answered, then the error
# Requests parsed ahead of the one being answered (one read can hold thousands): past this, the queued ones
# are answered, then 503 and close. Envoy parses one request at a time, so has no such queue.
MAX_PIPELINED = 128
LINGER_S = 1.0
REQUEST_HEADERS_TIMEOUT = local_reply(408, b"request headers not received in time\n", close=True)

# Request headers the proxy reads while parsing; the rest are forwarded untouched.
_H_HOST = b"host"
_H_CL = b"content-length"
_H_TE = b"transfer-encoding"
_H_CONN = b"connection"
_H_RID = b"x-request-id"
_H_XFF = b"x-forwarded-for"
_H_XFP = b"x-forwarded-proto"
_H_UA = b"user-agent"
_H_UPGRADE = b"upgrade"
_H_EXPECT = b"expect"
H2_PREFACE_START = b"PRI * HTTP/2.0\r\n"
_SPECIAL = frozenset({_H_HOST, _H_CL, _H_TE, _H_CONN, _H_RID, _H_XFF, _H_XFP, _H_UA, _H_UPGRADE, _H_EXPECT})


class Downstream(asyncio.Protocol):
    # Request bytes an h2 upstream stream may hold for the server's window before reading from this client pauses.
    upstream_window = 1 << 20
    __slots__ = (
        "active",
        "buffered",
        "chunk_watch",
        "closed",
        "deferred_error",
        "ex",
        "head_bytes",
        "head_started",
        "header_count",
        "header_sum",
        "held",
        "held_eof",
        "held_size",
        "in_headers",
        "last_active",
        "lingering",
        "local",
        "loops_to_self",
        "out",
        "parser",
        "parsing",
        "paused",
        "peer_ip",
        "proxy",
        "queue",
        "raw_body",
        "route_config",
        "ssl_object",
        "table",
        "transport",
        "write_paused",
    )

    def __init__(self, proxy: PlaneProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = HttpRequestParser(self)
        self.ex: Exchange | None = None  # the request being parsed
        self.active: Exchange | None = None  # the request being answered
        self.queue: list[Exchange] = []
        self.out: list[bytes] = []
        self.paused = 0
        self.write_paused = False
        self.closed = False
        self.lingering = False
        self.in_headers = False
        self.head_bytes = 0
        self.header_sum = 0
        self.header_count = 0
        self.buffered = 0  # request body bytes held while the upstream connection is being opened
        self.deferred_error: tuple[bytes, int] | None = None  # answered once the requests before it are
        self.head_started = 0.0  # loop time the request head being parsed began (slow-header defence)
        self.last_active = 0.0
        self.local: tuple[str, int] = ("", 0)
        self.peer_ip = ""
        self.loops_to_self = False
        self.table: RoutingTable | None = None
        self.route_config: CompiledRouteConfig | None = None
        self.ssl_object = None  # a TLS connection's (agent/proxy/tls.py set what request_head reads of it)
        self.held: list[bytes] | None = None  # not None: after a tunnel request, waiting for its outcome
        self.held_size = 0
        self.held_eof = False
        self.parsing = False  # inside feed_data (exchange_done must not re-enter the parser)
        self.raw_body = 0  # body bytes of an h2c upgrade request still to read (llhttp skips them)
        self.chunk_watch = False  # after a chunk header, until body bytes: the last chunk's trailers

    # ---- transport events ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ssl_object = transport.get_extra_info("ssl_object")
        proxy = self.proxy
        stats = proxy.stats
        stats.downstream_active += 1
        stats.downstream_total += 1
        proxy.connections.add(self)
        self.last_active = proxy.loop.time()
        sockname = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        self.local = proxy.original_destination(sockname, peer)
        self.peer_ip = peer[0].removeprefix("::ffff:") if peer else ""
        self.loops_to_self = self.local[1] in proxy.listen_ports
        refusal = proxy.admit(self)  # plane total, per-source share, memory overload (server.py)
        if refusal is not None:
            self.out.append(H1_REFUSALS[refusal])
            self.linger_close()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.lingering or self.deferred_error is not None:
            return
        self.last_active = self.proxy.loop.time()
        if self.held is not None:
            self._hold(data)
            return
        if self.raw_body:
            data = self._read_raw_body(data)
            if not data:
                self._flush_all()
                return
        if self.ex is None and self.active is None and data.startswith(H2_PREFACE_START):
            self._switch_to_h2(data)  # h2c prior knowledge: the first bytes decide, on any port
            return
        if self.in_headers or self.ex is None or self.chunk_watch:
            self.head_bytes += len(data)
        self.parsing = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self.parsing = False
            offset = upgrade.args[0] if upgrade.args else len(data)
            if not self._after_upgrade(data[offset:]):
                return
        except HttpParserError as err:
            refused = err.__context__
            if isinstance(refused, Refused):
                self.protocol_error(refused.reply, refused.status)
            elif self.header_sum > MAX_HEADER_BYTES:
                self.protocol_error(HEADERS_TOO_LARGE, 431)
            elif "version" in str(err):  # llhttp takes 1.0, 1.1 (and 0.9, 2.0: check_head): 505 for the rest
                self.protocol_error(VERSION_NOT_SUPPORTED, 505)
            else:
                self.protocol_error(BAD_REQUEST, 400)
            return
        finally:
            self.parsing = False
        if (self.in_headers or self.chunk_watch) and self.head_bytes > MAX_HEADER_BYTES:
            self.protocol_error(HEADERS_TOO_LARGE, 431)  # a header section, or trailers, that never end
            return
        self._flush_all()

    def _flush_all(self) -> None:
        active = self.active
        if active is not None and active.upreq.out:
            active.upreq.flush()
        ex = self.ex
        if ex is not None and ex is not active and ex.upreq.out:
            ex.upreq.flush()
        if self.out:
            self.flush()

    def _switch_to_h2(self, data: bytes) -> None:
        self.closed = True  # this protocol object is done; H2Downstream counts the connection afresh
        proxy = self.proxy
        proxy.stats.downstream_active -= 1
        proxy.stats.downstream_total -= 1
        proxy.connections.discard(self)
        proxy.release(self)
        h2ds = proxy.h2_protocol(preread=data)
        self.transport.set_protocol(h2ds)
        h2ds.connection_made(self.transport)

    def _after_upgrade(self, rest: bytes) -> bool:
        """llhttp stopped after a request with Connection: upgrade, or CONNECT; `rest` is what followed its
        head. Returns whether data_received should go on flushing."""
        if self.closed or self.lingering:
            return False
        if self.held is not None:  # a tunnel request: `rest` is the tunnel's, or the next request's
            if rest:
                self._hold(rest)
            ex = self.ex
            if ex is not None and ex.finished and ex is not self.active:
                self._release_held()  # answered (refused) while the parser was still running
            return True
        if self.raw_body:  # an h2c upgrade request forwarded as a plain one: its body is read here
            rest = self._read_raw_body(rest)
        if rest:
            self.data_received(rest)
            return False
        return True

    def _read_raw_body(self, data: bytes) -> bytes:
        """Feed the body llhttp skipped to the exchange; returns the bytes after it."""
        n = self.raw_body
        part, rest = data[:n], data[n:]
        self.raw_body -= len(part)
        ex = self.ex
        if ex is not None:
            if part:
                ex.on_request_body(part)
                self._bound_body(ex, len(part))
            if not self.raw_body:
                ex.on_request_complete()
        return rest

    def _bound_body(self, ex: Exchange, n: int) -> None:
        """Body bytes buffered while the upstream connection is being opened (or while queued behind a pipelined
        request) are bounded by the SLA's buffer_limit_bytes: past it, the client's socket is not read."""
        if ex.attempt.conn is None and not ex.finished:
            self.buffered += n
            if self.buffered > self.proxy.sla.buffer_limit_bytes:
                self.pause(PAUSE_BUFFER)

    # ---- bytes held after a tunnel request ----------------------------------------------------------

    def _hold(self, data: bytes) -> None:
        self.held.append(data)  # type: ignore[union-attr]
        self.held_size += len(data)
        if self.held_size > self.proxy.sla.buffer_limit_bytes:
            self.pause(PAUSE_HELD)

    def take_held(self) -> tuple[bytes, bool]:
        """For the tunnel: what the client sent after its request, and whether it half-closed since."""
        held, eof = b"".join(self.held or ()), self.held_eof
        self.held = None
        self.held_size = 0
        self.held_eof = False
        return held, eof

    def _release_held(self) -> None:
        """The request did not become a tunnel: the connection stays HTTP and parses what followed it."""
        held, eof = self.take_held()
        self.resume(PAUSE_HELD)
        if held and not self.closed:
            self.data_received(held)
        if eof:
            self.close()  # as for any client FIN (eof_received)

    def eof_received(self) -> bool | None:
        if self.held is not None:  # a tunnel may start: it carries the half-close
            self.held_eof = True
            return True
        # As Envoy by default: a client's FIN ends the connection and the request in flight (DC). A socket
        # cannot tell a half-close from a close, and a closed client would only get our response as RST.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        proxy = self.proxy
        proxy.stats.downstream_active -= 1
        proxy.connections.discard(self)
        proxy.release(self)
        self.queue.clear()
        active = self.active
        if active is not None:
            active.on_downstream_lost()

    def pause_writing(self) -> None:  # the client is slow: stop reading the upstream response
        self.write_paused = True
        active = self.active
        if active is not None and active.attempt.conn is not None:
            active.attempt.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        active = self.active
        if active is not None and active.attempt.conn is not None:
            active.attempt.conn.resume_reading()

    # ---- flow control helpers ----------------------------------------------------------------------

    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    def pause_for_upstream(self) -> None:
        self.pause(PAUSE_UPSTREAM)

    def resume_for_upstream(self) -> None:
        self.resume(PAUSE_UPSTREAM)

    def resume_for_buffer(self) -> None:
        self.buffered = 0
        if self.paused & PAUSE_BUFFER:  # twice per request: the call only when paused
            self.resume(PAUSE_BUFFER)

    def flush(self) -> None:
        out = self.out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True
            self.transport.close()

    def stop_keep_alive(self) -> None:
        """limits.ClientConnection: exchange_done already closes after the response while the proxy drains, and
        each request is told `connection: close` while the worker sheds (PlaneProxy.overload_gate)."""

    def buffered_bytes(self) -> int:
        """Bytes this connection holds (agent/proxy/overload.py BufferHolder): output not yet written, the
        transport's write buffer, tunnel bytes held, request bytes waiting for the upstream."""
        n = self.held_size + sum(map(len, self.out))
        if not self.closed:
            n += self.transport.get_write_buffer_size()
        for ex in {id(e): e for e in (self.active, self.ex) if e is not None}.values():
            n += ex.upreq.buffered()
        return n

    def abort(self) -> None:
        """Reset now (overload.BufferHolder): the worker is past its hard memory threshold."""
        if not self.closed:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # RST, not FIN: the kernel drops the send queue too
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    def linger_close(self) -> None:
        """Send what is queued, shut our side, and drop whatever the client still sends until it closes
        (at most LINGER_S): closing with unread input makes the kernel send RST, which can destroy the
        error response before the client reads it."""
        if self.closed or self.lingering:
            return
        self.lingering = True
        self.flush()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.proxy.loop.call_later(LINGER_S, self.close)

    def headers_overdue(self, now: float, timeout_s: float) -> bool:
        """A request head still incomplete `timeout_s` after its first byte (slowloris): answered 408 and closed."""
        if not self.in_headers or self.closed or self.lingering or self.deferred_error is not None:
            return False
        if now - self.head_started <= timeout_s:
            return False
        self.protocol_error(REQUEST_HEADERS_TIMEOUT, 408)
        return True

    def protocol_error(self, reply: bytes, status: int) -> None:
        """Malformed input: answer (if nothing else is being answered), log, and close. Well-formed requests
        parsed before it (pipelined) are answered first: the error waits for them (exchange_done)."""
        active = self.active
        bad = self.ex
        if bad is not None and bad is not active and bad in self.queue:
            self.queue.remove(bad)
        if active is not None and active is not bad and not active.finished and not self.lingering:
            self.deferred_error = (reply, status)
            self.pause(PAUSE_ERROR)
            return
        if active is not None:
            self.active = None
            active.on_downstream_lost()  # the connection ends here; the request in flight with it
        if active is None or not active.relay.started:
            self.out.append(reply)  # after what is queued (responses to earlier requests, not yet flushed)
        ex = self.ex
        rec = accesslog.AccessRecord(
            start_time=time.time(), method=ex.method if ex else "-", path=ex.path if ex else "-",
            protocol="HTTP/1.1", status=status, flags=accesslog.DPE, bytes_rx=0, bytes_tx=0, duration_ms=0,
            upstream_ms=None, xff=None, user_agent=None, request_id=None, authority=None, upstream_host=None,
            plane=self.proxy.plane_name,
        )
        self.proxy.stats.responses[status // 100] += 1
        self.proxy.log.append(rec)
        self.linger_close()

    # ---- httptools callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.ex = Exchange(self)
        self.in_headers = True
        self.head_started = self.last_active  # the loop's time, read by data_received (the parser's caller)
        self.header_sum = 0
        self.header_count = 0

    def on_url(self, url: bytes) -> None:
        ex = self.ex
        ex.target = ex.target + url if ex.target else url  # type: ignore[union-attr]
        self.header_sum += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex: Exchange = self.ex  # type: ignore[assignment]
        n = name.lower()
        self.header_sum += len(name) + len(value) + 4
        count = self.header_count = self.header_count + 1
        if count > MAX_HEADERS_COUNT:
            raise Refused(431, b"too many header fields\n")
        if not self.in_headers:  # after the head: the trailers of a chunked body
            if self.header_sum > MAX_HEADER_BYTES:
                raise HttpParserError("trailers too large")  # answered with 431 in data_received
            ex.on_request_trailer(n, value)
            return
        if n in _SPECIAL:  # the commonest first
            if n == _H_HOST:
                check_host(ex, value)
            elif n == _H_UA:
                ex.user_agent = value.decode("latin-1")
            elif n == _H_CL:
                ex.req_length = int(value)  # llhttp has validated it
            elif n == _H_TE:
                # Only plain "chunked" is relayed (the proxy re-frames bodies); anything else, or a second
                # Transfer-Encoding, is a smuggling vector: 400 before the request goes anywhere.
                if ex.req_chunked or value.strip().lower() != b"chunked":
                    raise HttpParserError("unsupported transfer-encoding")
                ex.req_chunked = ex.upreq.chunked = True
            elif n == _H_CONN:
                if ex.connection_values is None:
                    ex.connection_values = [value]
                else:
                    ex.connection_values.append(value)
            elif n == _H_RID:
                ex.request_id = value.decode("latin-1")
            elif n == _H_XFF:
                xff = value.decode("latin-1")
                ex.xff = f"{ex.xff}, {xff}" if ex.xff else xff
                return  # re-emitted with the client appended
            elif n == _H_XFP:
                ex.has_xfp = True
            elif n == _H_UPGRADE:
                ex.upgrade = value
            elif n == _H_EXPECT:
                check_expect(ex, value)
                return  # answered by the proxy (Exchange._route), never forwarded
        ex.headers.append((n, value))

    def on_headers_complete(self) -> None:
        ex: Exchange = self.ex  # type: ignore[assignment]
        self.in_headers = False
        self.head_bytes = 0
        self.header_count = 0  # trailers count afresh
        if self.header_sum > MAX_HEADER_BYTES:
            raise HttpParserError("header section too large")  # answered with 431 in data_received
        parser = self.parser
        ex.method_b = method = parser.get_method()
        keep_alive = ex.keep_alive = parser.should_keep_alive()
        # llhttp takes HTTP/0.9, 1.0, 1.1 and 2.0 and, without a Connection header, keeps only 1.1 alive: then the
        # version is known (ex.version's default) without get_http_version(), a str.format, the head's dearest call.
        if not keep_alive or ex.connection_values is not None:
            ex.version = parser.get_http_version()
        ex.is_head = ex.relay.is_head = method == b"HEAD"
        check_head(ex, method == b"CONNECT")
        if len(self.queue) >= MAX_PIPELINED:
            raise Refused(503, b"too many pipelined requests\n")
        if method == b"CONNECT":
            self._tunnel_request(ex, TUNNEL_CONNECT)
        elif parser.should_upgrade():
            self._upgrade_request(ex)
        else:
            ex.upgrade = b""  # Upgrade without Connection: upgrade is only a hop-by-hop header
        if self.active is None:
            self.active = ex
            ex.start()
        else:
            self.queue.append(ex)
            self.pause(PAUSE_PIPELINE)

    def _upgrade_request(self, ex: Exchange) -> None:
        """Connection: upgrade + Upgrade. h2c is never tunneled: forwarded as a plain request (as Envoy does),
        with the body llhttp will skip read by _read_raw_body. Anything else may become a tunnel."""
        if b"h2c" in connection_tokens(ex.upgrade):
            ex.upgrade = b""
            if ex.req_chunked:
                raise Refused(400, b"a chunked body on an h2c upgrade request is not supported\n")
            self.raw_body = ex.req_length
            return
        if ex.version != "1.1":
            raise Refused(400, b"protocol upgrades need HTTP/1.1\n")
        self._tunnel_request(ex, TUNNEL_UPGRADE)

    def _tunnel_request(self, ex: Exchange, kind: int) -> None:
        what = b"CONNECT" if kind == TUNNEL_CONNECT else b"an upgrade request"
        if ex.req_length or ex.req_chunked:
            raise Refused(400, what + b" cannot carry a request body\n")
        if kind == TUNNEL_CONNECT:
            ex.connect_to = parse_authority(ex.target)
            if ex.connect_to is None:
                raise Refused(400, b"CONNECT needs an authority-form target (host:port)\n")
            ex.authority = ex.target.decode("latin-1")  # routed (virtual host) by its target, as Envoy does
        ex.tunnel = kind
        self.held = []

    def on_chunk_header(self) -> None:
        self.chunk_watch = True
        self.head_bytes = 0

    def on_chunk_complete(self) -> None:
        self.chunk_watch = False

    def on_body(self, body: bytes) -> None:
        if self.chunk_watch:
            self.chunk_watch = False
        ex: Exchange = self.ex  # type: ignore[assignment]
        ex.on_request_body(body)
        if ex.attempt.conn is None:  # still connecting, or queued behind a pipelined request
            self._bound_body(ex, len(body))

    def on_message_complete(self) -> None:
        ex = self.ex
        if ex is not None and not self.raw_body:  # an h2c upgrade's body is still to come
            if ex.upreq.trailers is not None and not self.parser.should_keep_alive():
                ex.keep_alive = False  # `Connection: close` among the trailers: llhttp takes nothing after it
            ex.on_request_complete()

    # ---- exchange hand-off -----------------------------------------------------------------------------

    def exchange_done(self, ex: Exchange, abort: bool) -> None:
        if ex is not self.active:
            return
        self.active = None
        self.buffered = 0
        if self.paused & PAUSE_BUFFER:
            self.resume(PAUSE_BUFFER)
        if abort or not ex.keep_alive:
            self.close()
            return
        # Draining, but this response's head promised keep-alive (it went out before the drain began): the
        # client may be sending its next request right now. Stay open as an idle connection: the drain closes
        # it once quiet (DRAIN_IDLE_CLOSE_S), and a request that comes first is answered, with `Connection: close`.
        self.last_active = self.proxy.loop.time()
        if self.held is not None and ex.tunnel:  # no tunnel after all: parse what followed (unless in the parser)
            if not self.parsing:
                self._release_held()
            return
        if self.queue:
            nxt = self.queue.pop(0)
            if not self.queue:
                self.resume(PAUSE_PIPELINE)
            self.active = nxt
            nxt.start()
            nxt.flush_upstream()
        elif self.deferred_error is not None:  # the requests before the malformed input are answered
            reply, status = self.deferred_error
            self.protocol_error(reply, status)
        elif self.paused & PAUSE_PIPELINE:
            self.resume(PAUSE_PIPELINE)
