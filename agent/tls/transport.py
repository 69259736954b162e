"""asyncio over the TLS engine (agent/tls/engine.py): a protocol on the TCP transport that drives a
TlsConn, and the TLS transport the HTTP codecs, relays and tunnels see (the stdlib SSL transport's contract:
write, close, abort, pause/resume reading, get_extra_info("ssl_object"), set_protocol).

`accept_tls` / `connect_tls` / `open_tls` are `loop.connect_accepted_socket(..., ssl=)` /
`loop.create_connection(..., ssl=, sock=)` / `loop.create_connection(..., host, port, ssl=)`: they return once
the handshake is done, after the protocol made by `factory` has had its
connection_made (called as the handshake completes, before any application byte is delivered); they raise
TlsError, TimeoutError (no finished handshake in `timeout` seconds) or ConnectionError. A TLS transport has no
half-close (as the stdlib's): the peer's EOF or close_notify is eof_received, then the connection closes.
`tls_server_protocol` is `loop.create_server(..., ssl=)`'s per-connection protocol, with the context chosen per
connection (a rotated certificate serves the next handshake).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL

from planemesh.agent.tls.engine import TlsConn, TlsError, TlsPeerView


class TlsTransport(asyncio.Transport):
    """The application's view of a TLS connection (plaintext in and out)."""

    def __init__(self, wire: _TlsWire) -> None:
        super().__init__()
        self._wire = wire
        self.view = wire.view
        self.write = wire.send  # type: ignore[method-assign]  # one call less per write on the hot path

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._wire.send(data)

    def writelines(self, chunks: Any) -> None:
        self._wire.send(b"".join(chunks))

    def write_eof(self) -> None:
        if not self._wire.half_close:
            raise NotImplementedError("TLS transports have no half-close")
        self._wire.write_eof()

    def can_write_eof(self) -> bool:
        return self._wire.half_close

    def allow_half_close(self) -> None:
        """Opt in to write_eof(): close_notify, then a TCP FIN, and keep reading (Envoy's TLS socket on a
        downstream half-close). Relays of TCP over TLS use it (agent/proxy/tcp_originate.py); the codecs do not."""
        self._wire.half_close = True

    def close(self) -> None:
        self._wire.close()

    def abort(self) -> None:
        self._wire.abort()

    def is_closing(self) -> bool:
        return self._wire.closing

    def pause_reading(self) -> None:
        self._wire.pause_reading()

    def resume_reading(self) -> None:
        self._wire.resume_reading()

    def is_reading(self) -> bool:
        return not self._wire.paused

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._wire.app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._wire.app  # type: ignore[return-value]

    def get_write_buffer_size(self) -> int:
        raw = self._wire.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._wire.raw is not None:
            self._wire.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._wire.raw.get_write_buffer_limits() if self._wire.raw is not None else (0, 0)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.view
        if name == "peercert":
            return self.view.getpeercert()
        if name == "sslcontext":
            return self._wire.tls.conn.get_context()
        if name == "ssl_session":  # resumable session (TlsConn.get_session), or None
            return self._wire.tls.get_session()
        raw = self._wire.raw
        return raw.get_extra_info(name, default) if raw is not None else default


class _TlsWire(asyncio.Protocol):
    """The TCP transport's protocol: handshake (with its timeout), then ciphertext <-> the application."""

    def __init__(
        self,
        tls: TlsConn,
        factory: Callable[[], Any],
        done: asyncio.Future | None,
        timeout: float,
        on_fail: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.tls, self.factory, self.done, self.timeout, self.on_fail = tls, factory, done, timeout, on_fail
        self.view = TlsPeerView(tls)
        self.raw: asyncio.Transport | None = None
        self.app: Any = None
        self.transport: TlsTransport | None = None
        self.closing = self.paused = self.eof = False
        self.half_close = self.eof_sent = False  # TlsTransport.allow_half_close / write_eof
        self.eof_told = False  # the application got its eof_received (once)
        self.timer: asyncio.TimerHandle | None = None
        self.held = b""  # a TLS 1.3 server's tickets, sent ahead of its first write (_handshake)
        self.read_end: TlsError | bool | None = None  # a close_notify / record error read while the app paused

    # -- the TCP side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(self.timeout, self._timed_out)
        if not self.tls.server:
            self._handshake()  # the ClientHello

    def data_received(self, data: bytes) -> None:
        self.tls.feed(data)
        if self.app is None:
            self._handshake()
        if self.app is not None and not self.paused:
            self._read()

    def eof_received(self) -> bool:
        self.eof = True
        if self.app is None:
            self._fail(ConnectionResetError("connection closed during the TLS handshake"))
        elif self.paused:  # records wait in the BIO: they and the EOF go to the application when it resumes
            return True
        else:
            self._read()
            self._eof_to_app()
            if self.half_close and not self.eof_sent and not self.closing:
                return True  # the peer is done; we may still write (write_eof or close ends our side)
        return False  # the TCP transport closes (no half-close over TLS)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        if self.app is None:
            self._fail(exc or ConnectionResetError("connection lost during the TLS handshake"))
        else:
            app, self.app = self.app, _Gone()
            if not isinstance(app, _Gone):
                app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # -- handshake
    def _handshake(self) -> None:
        try:
            finished = self.tls.handshake()
        except TlsError as exc:
            self._flush()  # the alert tells the peer why
            self._fail(exc)
            return
        if finished and self.tls.server and self.tls.tls13():
            # What a TLS 1.3 server writes as its handshake completes is its session tickets: they go out with
            # the first bytes it sends (a response, or the close), as BoringSSL (Envoy) sends them, instead of
            # a write of their own that a client closing right after its handshake never reads.
            self.held = self.tls.outgoing()
        else:
            self._flush()
        if finished:
            self._established()

    def _established(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.done is not None and self.done.done():  # the waiter went away (cancelled): nobody owns this
            self.abort()
            return
        self.transport = TlsTransport(self)
        self.app = self.factory()
        self.app.connection_made(self.transport)
        if self.done is not None:
            self.done.set_result((self.transport, self.app))

    def _timed_out(self) -> None:
        if self.app is None:
            self._fail(TimeoutError(f"TLS handshake not finished in {self.timeout:g} s"))

    def _fail(self, exc: BaseException) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if isinstance(self.app, _Gone):
            return  # failed already
        self.app = _Gone()
        self.closing = True
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)
        if self.on_fail is not None:
            self.on_fail(exc)
        if self.raw is not None and not self.raw.is_closing():
            self.raw.close()  # after the alert, if any

    # -- application data
    def _read(self) -> None:
        # SSL_read returns one record (16 KiB at most): every record the BIO holds (what one TCP read brought) goes
        # to the application in one data_received, as the stdlib's SSL transport delivers it (a codec assembling
        # a 256 KiB frame, HBONE's h2, re-concatenated it once per record). A close_notify or a record error after
        # the data waits while the application paused (or closed) on that data.
        if not self.paused and not self.closing:
            end, self.read_end = self.read_end, None
            if end is None:
                end = self._read_records()
            if end is not None:
                if self.paused or self.closing:
                    self.read_end = end
                else:
                    self._flush()
                    if end is True:  # close_notify
                        self._eof_to_app()
                        if not self.half_close or self.eof_sent:
                            self.close()  # (half-close: our side stays open until write_eof or close)
                    else:
                        self.abort_with(end)  # type: ignore[arg-type]
                    return
        self._flush()  # tickets, key updates

    def _read_records(self) -> TlsError | bool | None:
        """Deliver the plaintext the BIO holds; True at a close_notify, the TlsError of a bad record, else None."""
        tls, chunks, end = self.tls, [], None
        while True:
            try:
                data = tls.read()
            except TlsError as exc:
                end = exc
                break
            if data is None:
                end = True
                break
            if not data:
                break
            chunks.append(data)
        if chunks:
            self.app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        return end

    def _eof_to_app(self) -> None:
        if self.app is not None and not isinstance(self.app, _Gone) and not self.eof_told:
            self.eof_told = True
            self.app.eof_received()

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or not data:
            return
        try:
            self.tls.write(data if type(data) is bytes else bytes(data))
        except TlsError as exc:
            self.abort_with(exc)
            return
        self._flush()

    def _flush(self) -> None:
        out = self.tls.outgoing()
        if out and self.raw is not None and not self.raw.is_closing():
            if self.held:
                out, self.held = self.held + out, b""
            self.raw.write(out)

    def pause_reading(self) -> None:
        if not self.paused and self.raw is not None:
            self.paused = True
            if not self.raw.is_closing():
                self.raw.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.raw is not None:
            self.paused = False
            if not self.raw.is_closing():
                self.raw.resume_reading()
            asyncio.get_running_loop().call_soon(self._resumed)

    def _resumed(self) -> None:  # plaintext left in the BIO while paused, then an EOF seen meanwhile
        if self.paused or isinstance(self.app, _Gone) or self.app is None:
            return
        self._read()
        if self.eof and not isinstance(self.app, _Gone):
            self._eof_to_app()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.tls.close_notify()
        self._flush()
        if self.raw is not None:
            self.raw.close()

    def write_eof(self) -> None:
        """Our close_notify and FIN; the peer's records are still read (TLS 1.3 and 1.2 allow it)."""
        if self.closing or self.eof_sent:
            return
        if self.eof_told:  # the peer ended its side already: both are done
            self.close()
            return
        self.eof_sent = True
        self.tls.close_notify()
        self._flush()
        if self.raw is not None and not self.raw.is_closing() and self.raw.can_write_eof():
            self.raw.write_eof()

    def abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    def abort_with(self, exc: BaseException) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()


class _Gone:
    """The application protocol after connection_lost (late callbacks go nowhere)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


def serve_tls(
    transport: asyncio.Transport,
    first: bytes,
    factory: Callable[[], Any],
    ctx: SSL.Context,
    timeout: float,
    on_fail: Callable[[BaseException], None],
) -> None:
    """The server handshake on an accepted transport that has already delivered `first` (the ClientHello's
    first bytes, read by the listener's gate): no second transport, no duplicated socket. `factory` is called
    when the handshake is done; `on_fail(exc)` once when it fails (the connection is then closed)."""
    wire = _TlsWire(TlsConn(ctx, server=True), factory, None, timeout, on_fail)
    transport.set_protocol(wire)
    wire.connection_made(transport)
    wire.data_received(first)


async def _start(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, tls: TlsConn, factory: Callable[[], Any], timeout: float
) -> tuple[TlsTransport, Any]:
    done: asyncio.Future = loop.create_future()
    wire = _TlsWire(tls, factory, done, timeout)
    await loop.connect_accepted_socket(lambda: wire, sock)
    try:
        return await done
    except asyncio.CancelledError:
        wire.abort()
        raise


async def accept_tls(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, factory: Callable[[], Any], ctx: SSL.Context, timeout: float
) -> tuple[TlsTransport, Any]:
    """The server handshake on an accepted socket (see the module docstring)."""
    return await _start(loop, sock, TlsConn(ctx, server=True), factory, timeout)


async def connect_tls(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    factory: Callable[[], Any],
    ctx: SSL.Context,
    sni: str | None,
    timeout: float,
    session: Any = None,
) -> tuple[TlsTransport, Any]:
    """The client handshake on a connected socket (`sni`: "" or None sends no SNI; `session`: one to resume)."""
    return await _start(loop, sock, TlsConn(ctx, server=False, sni=sni, session=session), factory, timeout)


async def open_tls(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    factory: Callable[[], Any],
    ctx: SSL.Context,
    sni: str | None,
    timeout: float,
) -> tuple[TlsTransport, Any]:
    """TCP to host:port, then the client handshake (`timeout` counts from the TCP connection)."""
    done: asyncio.Future = loop.create_future()
    wire = _TlsWire(TlsConn(ctx, server=False, sni=sni), factory, done, timeout)
    try:
        await loop.create_connection(lambda: wire, host, port)
        return await done
    except asyncio.CancelledError:
        wire.abort()
        raise


def tls_server_protocol(
    ctx: SSL.Context,
    factory: Callable[[], Any],
    timeout: float,
    on_fail: Callable[[BaseException, Any], None] | None = None,
) -> asyncio.Protocol:
    """The protocol of one accepted TCP connection (a `loop.create_server` factory returns one per connection):
    the server handshake on `ctx` within `timeout`, then `factory()`'s protocol on the TLS transport. A failed
    handshake closes the connection after its alert and calls `on_fail(exc, peername)`."""
    wire: _TlsWire

    def failed(exc: BaseException) -> None:
        if on_fail is not None:
            raw = wire.raw
            on_fail(exc, raw.get_extra_info("peername") if raw is not None else None)

    wire = _TlsWire(TlsConn(ctx, server=True), factory, None, timeout, failed)
    return wire
