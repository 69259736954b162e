"""The interfaces the proxy's layers call each other through, as `typing.Protocol`s (httpcore's backend idea).

A lower layer (the upstream connection pool, the h2 codec, the tunnel and passthrough code) names what it calls
back by one of these, never by importing the class that implements it: the import graph of agent/proxy/ stays
a tree (checked by /work/shared/tools/import_cycles.py). Implementations, for orientation:

    Proxy           server.PlaneProxy            what connections and requests use of their plane's proxy
    Timed           attempts.Attempt, h2_stream.Bridge
                                                 what the proxy's deadline sweep checks
    ClientConn      downstream.Downstream        an HTTP/1.1 client connection, as its requests see it
    H1Request       exchange.Exchange            an HTTP/1.x request, as its head checks, its upstream head and
                                                 its tunnel see it
    AttemptOwner    exchange.Exchange            the request an Attempt serves (attempts.py, h1_over_h2.py)
    RelayOwner      exchange.Exchange            the request a ResponseRelay answers (response.py)
    H2Attempt       attempts.Attempt             an attempt as h1_over_h2.py's stream sees it
    PoolUser        attempts.Attempt, h2_upstream.H1Stream
                                                 what UpstreamPool drives: connected, failed, overloaded
    ResponseSink    response.ResponseRelay, h2_upstream.H1Stream, h1_over_h2.H2Stream's relay
                                                 what an UpstreamConnection drives: the response events
    UpstreamUser    h2_upstream.H1Stream         both of the above in one object
    UpstreamConn    upstream.UpstreamConnection  one pooled HTTP/1.1 upstream connection
    H2Client        h2_downstream.H2Downstream   an h2 client connection, as its streams see it
    H2StreamUser    h2_stream.Bridge             what an h2 upstream connection drives: the response events
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from planemesh.agent.proxy.messages import ResponseEvents, ResponseHead

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
    """What the proxy's deadline sweep checks (attempts.Attempt, h2_stream.Bridge)."""

    deadline: float
    try_deadline: float

    def on_timeout(self, now: float) -> None: ...


class ClientConn(Protocol):
    """An HTTP/1.1 client connection, as its requests see it (downstream.Downstream)."""

    proxy: Proxy
    out: list[bytes]
    local: tuple[str, int]
    peer_ip: str
    write_paused: bool
    transport: Any
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
    """The request an Attempt (attempts.py) serves: what it answers, replays and flushes (exchange.Exchange)."""

    ds: ClientConn
    finished: bool
    head: bytes
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
    """The request a ResponseRelay (response.py) answers (exchange.Exchange)."""

    ds: ClientConn
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
    """An attempt (attempts.Attempt) as h1_over_h2.py's stream sees it."""

    ex: Any  # AttemptOwner & RelayOwner
    ds: ClientConn
    conn: Any
    h2_fields: Fields | None
    upstream_host: str | None
    upstream_key: tuple | None
    connect_timeout_s: float

    def on_connected(self, conn: Any) -> None: ...
    def on_connect_failed(self, timed_out: bool) -> None: ...
    def end(self, status: int) -> None: ...
    def may_retry(self, condition: str, status: int = 0) -> bool: ...
    def retry(self, reuse: bool = False) -> None: ...
    def exhausted(self, flag: str) -> str: ...


class UpstreamConn(Protocol):
    """One pooled HTTP/1.1 upstream connection (upstream.UpstreamConnection)."""

    exchange: Any
    transport: Any
    ready: bool
    reused: bool

    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class PoolUser(Protocol):
    """What upstream.UpstreamPool drives while it finds or opens a connection (attempts.Attempt, H1Stream)."""

    ds: Any  # flush() of the side the answer goes to
    finished: bool
    pending: bool
    connect_task: Any
    upstream_host: str | None
    upstream_key: tuple | None

    def on_connected(self, conn: UpstreamConn) -> None: ...
    def on_connect_failed(self, timed_out: bool) -> None: ...
    def overloaded(self, which: bytes) -> None: ...


class ResponseSink(Protocol):
    """What an UpstreamConnection (its `exchange`) drives: the response events (response.ResponseRelay, H1Stream)."""

    ds: Any  # flush() and write back-pressure of the side the response goes to
    is_head: bool

    def on_response_head(self, head: ResponseHead) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_trailers(self, trailers: Fields) -> None: ...
    def on_response_complete(self) -> None: ...
    def on_upstream_lost(self, conn: UpstreamConn) -> None: ...
    def on_upstream_protocol_error(self) -> None: ...
    def on_upstream_upgraded(self, conn: UpstreamConn, rest: bytes) -> None: ...


class UpstreamUser(PoolUser, ResponseSink, Protocol):
    """Both sides in one object (h2_upstream.H1Stream: an h2 stream's HTTP/1.1 upstream request)."""


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

    def send(self, sid: int, data: bytes | list, end: bool, on_sent: Any = None) -> None: ...
    def respond(self, sid: int, headers: Fields, end: bool) -> None: ...
    def reset(self, sid: int, code: int = ...) -> None: ...
    def ack(self, sid: int, n: int) -> None: ...
    def stream_done(self, stream: Any, reset_by_client: bool) -> None: ...


class H2StreamUser(ResponseEvents, Protocol):
    """What an upstream of an h2 stream (h2_upstream.H2Upstream, H1Stream) drives (h2_stream.Bridge): the neutral
    response events (messages.ResponseEvents) and what the upstream reads of the request."""

    ds: H2Client
    sid: int
    up: Any
    up_sid: int
    status: int
    bytes_rx: int
    bytes_tx: int
    req_ended: bool
    reopened: int
    method_b: bytes
    up_path: bytes
    up_authority: bytes | None
    fields: Fields

    def upstream_headers(self) -> Fields: ...
    def retry_status(self, status: int) -> bool: ...
    def respond(self, headers: Fields, end: bool) -> None: ...
    def up_failed(self, status: int, message: str, flag: str) -> None: ...
    def finish(self, flag: str) -> None: ...
