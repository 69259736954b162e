"""The interfaces the proxy's layers call each other through, as `typing.Protocol`s (httpcore's backend idea).

A lower layer (the upstream connection pool, the h2 codec, the tunnel and passthrough code) names what it calls
back by one of these, never by importing the class that implements it: the import graph of agent/proxy/ stays
a tree (checked by /work/shared/tools/import_cycles.py). Implementations, for orientation:

    Proxy           server.PlaneProxy            what connections and requests use of their plane's proxy
    Timed           attempts.Attempt             what the proxy's deadline sweep checks
    RequestSource   downstream.Downstream, h2_stream.Bridge
                                                 a request's client side as its Attempt, its ResponseRelay and its
                                                 upstream stream see it (an HTTP/1.x connection, or one h2 stream)
    ClientConn      downstream.Downstream        an HTTP/1.1 client connection, as its requests see it
    H1Request       exchange.Exchange            an HTTP/1.x request, as its head checks, its upstream head, its
                                                 response writer and its tunnel see it
    AttemptOwner    exchange.Exchange, h2_stream.Bridge
                                                 the request an Attempt serves (attempts.py, h2_upstream.py)
    RelayOwner      exchange.Exchange, h2_stream.Bridge
                                                 the request a ResponseRelay answers (response.py)
    H2Attempt       attempts.Attempt             an attempt as its h2 upstream stream sees it
    PoolUser        attempts.Attempt             what UpstreamPool drives: connected, failed, overloaded
    UpstreamStream  upstream.UpstreamConnection, h2_upstream.H2ClientStream
                                                 one request's upstream, HTTP/1.1 or h2 (what an Attempt holds)
    ResponseSink    response.ResponseRelay       what an upstream stream drives: the neutral response events
    DownstreamSink  response_h1.H1ResponseWriter, response_h2.H2ResponseWriter
                                                 what the relay drives: the response, framed for the client
    H2Client        h2_downstream.H2Downstream   an h2 client connection, as its streams see it

One relay (response.py) joins any upstream stream to any downstream sink: there is no adapter per pair of codecs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from planemesh.agent.proxy.messages import ResponseHead

if TYPE_CHECKING:
    import asyncio

    from planemesh.agent.proxy.stats import PlaneStats
    from planemesh.model.planes import SLA

Fields = list[tuple[bytes, bytes]]


class Proxy(Protocol):
    """What connections and requests use of the plane's proxy (server.PlaneProxy)."""

    plane_name: str
    sla: SLA
    stats: PlaneStats
    loop: asyncio.AbstractEventLoop
    table: Any  # routing_table.RoutingTable
    pool: Any  # upstream.UpstreamPool
    h2_pool: Any  # h2_upstream.H2Pool
    bucket: Any
    overload: Any
    share: Any
    log: Any
    draining: bool
    listen_ports: Any
    connections: set
    inflight: set

    def clock(self) -> float: ...
    def original_destination(self, sockname: tuple, peername: tuple) -> tuple[str, int]: ...
    def upstream_binding(self, host: str) -> tuple[str | None, int]: ...
    def mirrors(self) -> Any: ...  # mirror.MirrorSender
    def watch_deadline(self, request: Any) -> None: ...
    def overload_gate(self, ex: Any) -> bool: ...
    def admit(self, conn: Any) -> bytes | None: ...
    def release(self, conn: Any) -> None: ...
    def open_connections(self) -> int: ...
    def http1_protocol(self) -> asyncio.Protocol: ...
    def h2_protocol(self, preread: bytes = b"") -> asyncio.Protocol: ...


class Timed(Protocol):
    """What the proxy's deadline sweep checks (attempts.Attempt)."""

    deadline: float
    try_deadline: float

    def on_timeout(self, now: float) -> None: ...


class RequestSource(Protocol):
    """A request's client side, as its Attempt, its ResponseRelay and its upstream stream see it (its `ds`):
    downstream.Downstream (an HTTP/1.x connection, one request at a time) or h2_stream.Bridge (one h2 stream)."""

    proxy: Proxy
    local: tuple[str, int]
    write_paused: bool  # the client is not reading: an upstream stream opened now starts paused
    upstream_window: int  # request bytes an h2 upstream stream may hold unsent before pause_for_upstream

    def flush(self) -> None: ...  # after an upstream read: what it produced goes to the client
    def resume_for_buffer(self) -> None: ...  # the upstream stream is open: what waited for it may go
    def pause_for_upstream(self) -> None: ...  # the upstream stream is not taking the request body: stop reading
    def resume_for_upstream(self) -> None: ...


class ClientConn(Protocol):
    """An HTTP/1.1 client connection, as its requests see it (downstream.Downstream)."""

    proxy: Proxy
    out: list[bytes]
    local: tuple[str, int]
    peer_ip: str
    write_paused: bool
    transport: Any
    ssl_object: Any  # the TLS connection's SSLObject (None: plaintext), as tls.py left it
    table: Any
    route_config: Any
    loops_to_self: bool

    def flush(self) -> None: ...
    def resume_for_buffer(self) -> None: ...
    def exchange_done(self, ex: Any, abort: bool) -> None: ...


class H1Request(Protocol):
    """An HTTP/1.x request (exchange.Exchange) as request_checks.py, request_head.py and tunnel.py see it."""

    ds: ClientConn
    target: bytes
    method_b: bytes
    version: str
    headers: Fields
    authority: str | None
    request_id: str | None
    xff: str | None
    user_agent: str | None
    connection_values: list[bytes] | None
    has_xfp: bool
    req_chunked: bool
    req_length: int
    expect_continue: int
    route: Any
    keep_alive: bool
    finished: bool
    bytes_rx: int
    t0: float
    t_tunnel: float
    attempt: Any  # attempts.Attempt
    relay: Any  # response.ResponseRelay

    def reply(self, status: int, body: bytes, headers: Any = (), flag: str = "") -> None: ...
    def finish(self, abort: bool = False) -> None: ...


class AttemptOwner(Protocol):
    """The request an Attempt (attempts.py) serves: what it answers, replays and flushes (exchange.Exchange,
    h2_stream.Bridge)."""

    ds: RequestSource
    finished: bool
    req_head: Any  # messages.RequestHead
    headers: Fields
    req_length: int
    req_chunked: bool
    relay: Any  # response.ResponseRelay: the connection's response events go there

    def replayable(self) -> bool: ...
    def rearm(self) -> None: ...
    def flush_upstream(self) -> None: ...
    def overloaded(self, which: bytes) -> None: ...
    def reply(self, status: int, body: bytes, headers: Any = (), flag: str = "") -> None: ...
    def abort(self, flag: str) -> None: ...


class RelayOwner(Protocol):
    """The request a ResponseRelay (response.py) answers (exchange.Exchange, h2_stream.Bridge)."""

    ds: RequestSource
    finished: bool
    version: str
    is_head: bool
    req_done: bool
    keep_alive: bool
    tunnel: int
    upgrade: bytes
    expect_continue: int
    route: Any
    flags: str
    attempt: Any  # attempts.Attempt: retry decisions and the connection

    def reply(self, status: int, body: bytes, headers: Any = (), flag: str = "") -> None: ...
    def abort(self, flag: str) -> None: ...
    def finish(self, abort: bool = False) -> None: ...


class H2Attempt(Protocol):
    """An attempt (attempts.Attempt) as its h2 upstream stream (h2_upstream.H2ClientStream) sees it."""

    ex: Any  # AttemptOwner & RelayOwner
    ds: RequestSource
    cluster: Any
    endpoint: Any
    conn: Any
    h2_fields: Fields | None
    upstream_host: str | None
    upstream_key: tuple | None
    connect_timeout_s: float
    breaker: Any  # circuit.CircuitBreaker | None: a new h2 connection takes its max_connections unit

    waiting: tuple | None  # (target, reuse) while it waits for a connection unit or a stream

    def on_connected(self, conn: Any) -> None: ...
    def hold_pending(self) -> bool: ...
    def release_pending(self) -> None: ...
    def wait_for_connection(self, target: tuple[str, int], reuse: bool = False) -> None: ...
    def stop_waiting(self) -> bool: ...
    def take_connection_unit(self) -> bool: ...
    def give_back_connection_unit(self) -> None: ...
    def on_free_stream(self) -> None: ...
    def on_connect_failed(self, timed_out: bool) -> None: ...
    def end(self, status: int) -> None: ...
    def may_retry(self, condition: str, status: int = 0) -> bool: ...
    def retry(self, reuse: bool = False) -> None: ...
    def exhausted(self, flag: str) -> str: ...


class UpstreamStream(Protocol):
    """One request's upstream: an HTTP/1.1 connection of the pool (upstream.UpstreamConnection) or a stream on a
    pooled h2 connection (h2_upstream.H2ClientStream). Its response events go to `exchange` (a ResponseSink);
    the request is written by its owner's flush_upstream (HTTP/1.1: bytes on `transport`; h2: write(pieces))."""

    exchange: Any  # ResponseSink
    ready: bool
    reused: bool  # a pooled connection: lost before any response, the request may be sent again on a fresh one

    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class PoolUser(Protocol):
    """What upstream.UpstreamPool drives while it finds or opens a connection (attempts.Attempt)."""

    ds: Any  # flush() of the side the answer goes to
    cluster: Any  # its TLS settings pick the connection (None: the original destination)
    endpoint: Any
    finished: bool
    pending: bool
    connect_task: Any
    upstream_host: str | None
    upstream_key: tuple | None

    def on_connected(self, conn: UpstreamStream) -> None: ...
    def on_connect_failed(self, timed_out: bool) -> None: ...
    def overloaded(self, which: bytes) -> None: ...


class ResponseSink(Protocol):
    """What an upstream stream (its `exchange`) drives: the neutral response events (response.ResponseRelay)."""

    ds: Any  # RequestSource: flush() and request back-pressure of the request's client side
    is_head: bool

    def on_response_head(self, head: ResponseHead) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_trailers(self, trailers: Fields) -> None: ...
    def on_response_complete(self) -> None: ...
    def on_upstream_lost(self, conn: UpstreamStream) -> None: ...
    def on_upstream_protocol_error(self) -> None: ...
    def on_upstream_upgraded(self, conn: UpstreamStream, rest: bytes) -> None: ...


class DownstreamSink(Protocol):
    """What the relay (response.py) drives once it has decided: the response, framed for the client by the
    request's downstream codec (response_h1.H1ResponseWriter, response_h2.H2ResponseWriter)."""

    def interim(self, head: ResponseHead) -> None: ...  # 1xx other than 101
    def response_head(self, status: int, fields: Fields, head: ResponseHead) -> None: ...  # fields: after the route
    def response_body(self, data: bytes) -> None: ...
    def response_trailers(self, trailers: Fields) -> None: ...
    def response_end(self) -> None: ...


class H2Client(Protocol):
    """An h2 client connection, as its request streams see it (h2_downstream.H2Downstream)."""

    proxy: Proxy
    local: tuple[str, int]
    peer_ip_b: bytes
    table: Any
    route_config: Any
    conn: Any  # the h2 state machine
    guard: Any
    paused_up: dict
    bridges: dict
    transport: Any
    write_paused: bool

    def send(self, sid: int, data: bytes | list, end: bool, on_sent: Any = None) -> None: ...
    def respond(self, sid: int, headers: Fields, end: bool) -> None: ...
    def reset(self, sid: int, code: int = ...) -> None: ...
    def ack(self, sid: int, n: int) -> None: ...
    def stream_done(self, stream: Any, reset_by_client: bool) -> None: ...
    def stop_keep_alive(self) -> None: ...
