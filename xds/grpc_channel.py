"""A small gRPC client on the caller's asyncio loop: one HTTP/2 connection (python-hyper h2, sans-IO) over a
plain or TLS socket, bidirectional streams and unary calls; xds/grpc_wire.py reads the responses.

    async with Channel("unix:///run/xds.sock", max_receive=256 << 20) as channel:
        call = channel.stream("/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
                              requests, DiscoveryResponse.FromString, metadata=(("authorization", "Bearer ..."),))
        while (msg := await call.read()) is not EOF: ...       # RpcError(code, details) when the call fails
        reply = await channel.unary(path, request, Reply.FromString, timeout_s=10)

What grpcio's channel did for the agent and this one does: ALPN h2, SNI and a verified name override, a client
certificate, keepalive PINGs (`keepalive_s`, unanswered within `keepalive_timeout_s` -> UNAVAILABLE; at most
two without a DATA/HEADERS frame sent in between, as grpc-core's `max_pings_without_data`, so servers enforcing
grpc's ping policy never see abuse), the receive limit (RESOURCE_EXHAUSTED), flow control both ways
(the server's windows are respected when sending; what is received is acknowledged once it is read into
messages), GOAWAY and a lost connection -> UNAVAILABLE naming what happened. No name-resolution policies, no
retries, no compression: the ADS client reconnects itself (xds/transport.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from planemesh.xds.grpc_wire import (
    DEFAULT_MAX_RECEIVE,
    EOF,
    ResponseReader,
    RpcError,
    StatusCode,
    authority,
    encode_message,
    parse_target,
    request_headers,
    split_frames,
)

WINDOW = 8 << 20  # receive window per stream and for the connection: a large push is not one round trip per 64 KB
MAX_FRAME = 1 << 20  # largest DATA frame accepted (fewer, larger frames for a large push)
READ_CHUNK = 1 << 18
CONNECT_TIMEOUT_S = 20.0  # grpc's minimum connect timeout
CLOSE_WAIT_S = 0.1
PINGS_WITHOUT_DATA = 2  # grpc-core's default grpc.http2.max_pings_without_data

Metadata = Sequence[tuple[str, str]]


def tls_context(ca_pem: bytes, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client context verifying the server against `ca_pem`, offering ALPN h2, with an optional client
    certificate (mTLS); TLS 1.2 at least, as gRPC requires."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode("ascii", "replace"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


class _Call:
    """One stream's receiving side: messages then EOF, or an RpcError; `read()` hands them out in order."""

    def __init__(self, stream_id: int, deserialize: Callable[[bytes], Any], max_receive: int) -> None:
        self.stream_id = stream_id
        self.deserialize = deserialize
        self.reader = ResponseReader(max_receive)
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.done = False  # final status known (EOF or an error queued)
        self.unacked = 0  # DATA bytes received whose window is given back once its messages are read

    def finish(self, result: Any) -> None:
        if not self.done:
            self.done = True
            self.inbox.put_nowait(result)


class Connection:
    """One HTTP/2 connection and its calls, driven by a reader task."""

    def __init__(
        self,
        target: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_receive: int,
        keepalive_s: float,
        keepalive_timeout_s: float,
        window: int = WINDOW,
    ) -> None:
        self.target, self._reader, self._writer = target, reader, writer
        self.max_receive = max_receive
        self.h2 = _H2(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.h2.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            }
        )
        if window > self.h2.inbound_flow_control_window:  # the connection's window (65,535 until raised)
            self.h2.increment_flow_control_window(window - self.h2.inbound_flow_control_window)
        self.calls: dict[int, _Call] = {}
        self.closed: RpcError | None = None  # why no new call can start here
        self._window = asyncio.Event()  # set when the server grants window (or the connection ends)
        self._ping_acked = asyncio.Event()
        self._pings_without_data = 0
        self._flush()
        self._tasks = [asyncio.create_task(self._read_loop())]
        if keepalive_s > 0:
            self._tasks.append(asyncio.create_task(self._keepalive(keepalive_s, keepalive_timeout_s)))

    # ---- sending ---------------------------------------------------------------------------------------
    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def _drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    def open(self, headers: list[tuple[str, str]], deserialize: Callable[[bytes], Any]) -> _Call:
        if self.closed is not None:
            raise self.closed
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers)
        self._pings_without_data = 0
        call = self.calls[stream_id] = _Call(stream_id, deserialize, self.max_receive)
        self._flush()
        return call

    async def send(self, call: _Call, payload: bytes, end_stream: bool = False) -> None:
        """Send `payload` within the server's flow-control windows and frame size; raises RpcError when the
        connection or the call ended first (the reader reports the call's own status)."""
        view = memoryview(payload)
        while True:
            self._check_sendable(call)
            size = min(len(view), self.h2.local_flow_control_window(call.stream_id), self.h2.max_outbound_frame_size)
            if size <= 0 and view:
                self._window.clear()
                await self._window.wait()
                continue
            chunk, view = bytes(view[:size]), view[size:]
            self.h2.send_data(call.stream_id, chunk, end_stream=end_stream and not view)
            self._pings_without_data = 0
            self._flush()
            await self._drain()
            if not view:
                return

    def _check_sendable(self, call: _Call) -> None:
        if self.closed is not None:
            raise self.closed
        if call.done or call.stream_id not in self.calls:
            raise RpcError(StatusCode.CANCELLED, "the call has ended")

    def end_requests(self, call: _Call) -> None:
        if self.closed is None and not call.done and call.stream_id in self.calls:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.end_stream(call.stream_id)
                self._flush()

    def cancel(self, call: _Call, code: StatusCode = StatusCode.CANCELLED, details: str = "cancelled") -> None:
        if call.stream_id in self.calls:
            del self.calls[call.stream_id]
            if self.closed is None:
                with contextlib.suppress(h2.exceptions.H2Error):
                    self.h2.reset_stream(call.stream_id, 8)  # CANCEL
                    self._flush()
        call.finish(RpcError(code, details))
        self._window.set()

    # ---- receiving -------------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        why = RpcError(StatusCode.UNAVAILABLE, f"the connection to {self.target} was closed by the server")
        pending = bytearray()
        try:
            while data := await self._reader.read(READ_CHUNK):
                pending += data
                for frame in split_frames(pending, self.h2.max_inbound_frame_size):  # one by one: ProtocolError below
                    for event in self.h2.receive_data(frame):
                        self._event(event)
                self._flush()
        except h2.exceptions.ProtocolError as exc:
            # h2 closes the connection on GOAWAY and refuses the frames a graceful server still sends after it:
            # that is the GOAWAY's end, not a protocol error of the server's (the frames before it were read).
            why = (self._goaway_error() if self.h2.goaway is not None
                   else RpcError(StatusCode.INTERNAL, f"HTTP/2 protocol error from {self.target}: {exc}"))  # fmt: skip
        except (ConnectionError, OSError) as exc:
            why = RpcError(StatusCode.UNAVAILABLE, f"the connection to {self.target} was lost: {exc}")
        except _Goaway as exc:
            why = exc.error
        except Exception as exc:  # a bug here must end the calls, never leave them waiting forever
            why = RpcError(StatusCode.INTERNAL, f"the gRPC client failed reading from {self.target}: {exc!r}")
        self._fail(why)

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._window.set()
        elif isinstance(event, h2.events.PingAckReceived):
            self._ping_acked.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            raise _Goaway(self._goaway_error())
        elif (call := self.calls.get(getattr(event, "stream_id", 0) or 0)) is not None:
            try:
                self._call_event(call, event)
            except RpcError as exc:
                self.cancel(call, exc.code(), exc.details())

    def _call_event(self, call: _Call, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            call.reader.headers(event.headers, end_stream=event.stream_ended is not None)
            if event.stream_ended is not None:
                self._end(call)
        elif isinstance(event, h2.events.DataReceived):
            call.unacked += event.flow_controlled_length
            messages = call.reader.data(event.data)
            for raw in messages:
                try:
                    call.inbox.put_nowait(call.deserialize(raw))
                except Exception as exc:  # a message that does not parse as the method's response type
                    raise RpcError(StatusCode.INTERNAL, f"cannot parse the response message: {exc}") from None
            if call.inbox.empty():  # only part of a message: its rest must be able to come (bounded by max_receive)
                self.consumed(call)
            if event.stream_ended is not None:
                raise call.reader.ended_without_trailers()
        elif isinstance(event, h2.events.TrailersReceived):
            call.reader.trailers(event.headers)
            self._end(call)
        elif isinstance(event, h2.events.StreamEnded):
            raise call.reader.ended_without_trailers()
        elif isinstance(event, h2.events.StreamReset):
            self.calls.pop(call.stream_id, None)
            call.finish(call.reader.reset(event.error_code))

    def _goaway_error(self) -> RpcError:
        code, data = self.h2.goaway or (0, b"")
        detail = data.decode("utf-8", "replace")
        return RpcError(StatusCode.UNAVAILABLE, f"the server {self.target} closed the connection (GOAWAY, "
                        f"HTTP/2 error {code}{': ' + detail if detail else ''})")  # fmt: skip

    def consumed(self, call: _Call) -> None:
        """Give the window of what `call` received back (WINDOW_UPDATE): called once its messages are read, so
        a reader that falls behind holds at most one window of messages here and the server waits."""
        if call.unacked and self.closed is None:
            with contextlib.suppress(h2.exceptions.H2Error):  # a closed stream: h2 still credits the connection
                self.h2.acknowledge_received_data(call.unacked, call.stream_id)
            call.unacked = 0
            self._flush()

    def _end(self, call: _Call) -> None:
        self.calls.pop(call.stream_id, None)
        call.finish(EOF)
        self._window.set()

    def _fail(self, error: RpcError) -> None:
        if self.closed is None:
            self.closed = error
        for call in list(self.calls.values()):
            call.finish(error)
        self.calls.clear()
        self._window.set()
        self._writer.close()

    async def _keepalive(self, every_s: float, timeout_s: float) -> None:
        while self.closed is None:
            await asyncio.sleep(every_s)
            if not self.calls or self._pings_without_data >= PINGS_WITHOUT_DATA or self.closed is not None:
                continue
            self._ping_acked.clear()
            self._pings_without_data += 1
            self.h2.ping(os.urandom(8))
            self._flush()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._ping_acked.wait()
            except TimeoutError:
                self._fail(
                    RpcError(
                        StatusCode.UNAVAILABLE, f"keepalive ping to {self.target} not answered within {timeout_s:g} s"
                    )
                )

    async def close(self) -> None:
        if self.closed is None:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.close_connection()
                self._flush()
            self._fail(RpcError(StatusCode.CANCELLED, "the channel was closed"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # A TLS peer that never answers close_notify would hold this for asyncio's 30 s shutdown timeout.
        # asyncio.wait, not wait_for: Python 3.11's wait_for can swallow a cancellation arriving as it returns.
        closing = asyncio.ensure_future(self._writer.wait_closed())
        try:
            done, _ = await asyncio.wait({closing}, timeout=CLOSE_WAIT_S)
        finally:
            if not closing.done():
                closing.cancel()
                self._writer.transport.abort()
        if done and closing.exception() is not None:
            self._writer.transport.abort()


class _H2(h2.connection.H2Connection):
    """h2's connection, remembering the GOAWAY it received (h2 raises on the frames that follow it in one read,
    and the ConnectionTerminated event is lost with them)."""

    goaway: tuple[int, bytes] | None = None

    def _receive_goaway_frame(self, frame: Any) -> Any:
        self.goaway = (int(frame.error_code), bytes(frame.additional_data or b""))
        return super()._receive_goaway_frame(frame)


class _Goaway(Exception):
    def __init__(self, error: RpcError) -> None:
        self.error = error


async def connect(
    target: str, tls: ssl.SSLContext | None, server_name: str | None, timeout_s: float = CONNECT_TIMEOUT_S
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The socket to `target` (TLS verified for `server_name`, else the host); RpcError UNAVAILABLE when it
    cannot be had, naming why (a TLS failure says `TLS handshake failed`)."""
    where = parse_target(target)
    try:
        async with asyncio.timeout(timeout_s):
            if isinstance(where, str):
                reader, writer = await asyncio.open_unix_connection(
                    where, ssl=tls, server_hostname=(server_name or "localhost") if tls else None, limit=READ_CHUNK
                )
            else:
                reader, writer = await asyncio.open_connection(
                    where[0],
                    where[1],
                    ssl=tls,
                    server_hostname=(server_name or where[0]) if tls else None,
                    limit=READ_CHUNK,
                )
    except ssl.SSLError as exc:
        raise RpcError(StatusCode.UNAVAILABLE, f"failed to connect to {target}: TLS handshake failed: {exc}") from None
    except TimeoutError:
        raise RpcError(StatusCode.UNAVAILABLE, f"failed to connect to {target}: no answer in {timeout_s:g} s") from None
    except (OSError, ValueError) as exc:
        raise RpcError(StatusCode.UNAVAILABLE, f"failed to connect to {target}: {exc}") from None
    if tls is not None:
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        if alpn not in (None, "h2"):
            writer.close()
            raise RpcError(StatusCode.UNAVAILABLE, f"failed to connect to {target}: the server chose ALPN {alpn!r}")
    return reader, writer


class StreamCall:
    """A bidirectional streaming call: the requests are sent by a task as `requests` yields them (the call's
    half-close when it ends); `read()` gives the responses, then EOF, or raises RpcError."""

    def __init__(
        self,
        channel: Channel,
        path: str,
        requests: AsyncIterator[Any],
        deserialize: Callable[[bytes], Any],
        metadata: Metadata,
    ) -> None:
        self._channel = channel
        self._call: _Call | None = None
        self._opened = asyncio.Event()
        self._error: RpcError | None = None
        self._task = asyncio.create_task(self._run(path, requests, deserialize, metadata))

    async def _run(
        self, path: str, requests: AsyncIterator[Any], deserialize: Callable[[bytes], Any], metadata: Metadata
    ) -> None:
        try:
            conn = await self._channel.connection()
            call = self._call = conn.open(self._channel.headers(path, metadata), deserialize)
        except RpcError as exc:
            self._error = exc
            return
        finally:
            self._opened.set()
        # A write racing the server's end of the call (a refused token) must not replace the server's status.
        with contextlib.suppress(RpcError):
            async for request in requests:
                await conn.send(call, encode_message(request.SerializeToString()))
            conn.end_requests(call)

    async def read(self) -> Any:
        await self._opened.wait()
        if self._call is None:
            raise self._error or RpcError(StatusCode.CANCELLED, "cancelled")
        item = await self._call.inbox.get()
        if self._call.inbox.empty() and self._channel.conn is not None:
            self._channel.conn.consumed(self._call)
        if isinstance(item, RpcError):
            self._call.inbox.put_nowait(item)  # every later read sees the same end
            raise item
        if item is EOF:
            self._call.inbox.put_nowait(EOF)
        return item

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Any]:
        while (msg := await self.read()) is not EOF:
            yield msg

    def cancel(self) -> bool:
        self._task.cancel()
        if self._call is None:
            self._error = self._error or RpcError(StatusCode.CANCELLED, "cancelled")
            self._opened.set()
            return True
        if self._call.done:
            return False
        if self._channel.conn is not None:
            self._channel.conn.cancel(self._call)
        return True


class Channel:
    """Calls to one target over one HTTP/2 connection, made at the first call (again after it is lost)."""

    def __init__(
        self,
        target: str,
        *,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        max_receive: int = DEFAULT_MAX_RECEIVE,
        keepalive_s: float = 30.0,
        keepalive_timeout_s: float = 10.0,
        user_agent: str = "planemesh",
        receive_window: int = WINDOW,
    ) -> None:
        parse_target(target)  # ValueError now for a target that can never work
        self.receive_window = receive_window
        self.target, self.tls, self.server_name = target, tls, server_name
        self.max_receive, self.user_agent = max_receive, user_agent
        self.keepalive_s, self.keepalive_timeout_s = keepalive_s, keepalive_timeout_s
        self.conn: Connection | None = None
        self._connecting = asyncio.Lock()

    def headers(self, path: str, metadata: Metadata, timeout_s: float | None = None) -> list[tuple[str, str]]:
        scheme = "https" if self.tls is not None else "http"
        name = self.server_name if self.tls is not None and self.server_name else authority(self.target)
        return request_headers(
            name, path, scheme=scheme, metadata=metadata, user_agent=self.user_agent, timeout_s=timeout_s
        )

    async def connection(self) -> Connection:
        async with self._connecting:
            if self.conn is None or self.conn.closed is not None:
                reader, writer = await connect(self.target, self.tls, self.server_name)
                self.conn = Connection(
                    self.target, reader, writer, self.max_receive, self.keepalive_s, self.keepalive_timeout_s,
                    self.receive_window,
                )  # fmt: skip
            return self.conn

    def stream(
        self, path: str, requests: AsyncIterator[Any], deserialize: Callable[[bytes], Any], metadata: Metadata = ()
    ) -> StreamCall:
        return StreamCall(self, path, requests, deserialize, metadata)

    async def unary(
        self,
        path: str,
        request: Any,
        deserialize: Callable[[bytes], Any],
        *,
        metadata: Metadata = (),
        timeout_s: float | None = None,
    ) -> Any:
        """One request, one response; RpcError DEADLINE_EXCEEDED after `timeout_s` (the stream is reset)."""
        call: _Call | None = None
        try:
            async with asyncio.timeout(timeout_s):
                conn = await self.connection()
                call = conn.open(self.headers(path, metadata, timeout_s), deserialize)
                await conn.send(call, encode_message(request.SerializeToString()), end_stream=True)
                response, end = await call.inbox.get(), EOF
                if not isinstance(response, RpcError) and response is not EOF:
                    end = await call.inbox.get()
                conn.consumed(call)
        except TimeoutError:
            if call is not None and self.conn is not None:
                self.conn.cancel(call, StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, f"no answer from {self.target} in {timeout_s:g} s") from None
        for item in (response, end):
            if isinstance(item, RpcError):
                raise item
        if response is EOF or end is not EOF:
            raise RpcError(StatusCode.INTERNAL, "a unary call must be answered with exactly one message")
        return response

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
