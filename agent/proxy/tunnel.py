"""Byte tunnels made from HTTP/1.1 requests: an upgrade (WebSocket, or any protocol the route allows) once the
upstream answered 101, and CONNECT once the proxy opened the connection to the target and answered 200.

Both ends copy through passthrough's pipes (half-close, back-pressure). The exchange stays active for the
tunnel's life (it holds its request slot, the route's idle timeout applies) and is logged when the tunnel
ends, with the bytes each way. The protocols the tunnel took the transports from get their connection_lost()
bookkeeping then, since asyncio now reports to the pipes.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.http1 import CONNECT_ESTABLISHED
from planemesh.agent.proxy.outlier import GATEWAY_FAILURE
from planemesh.agent.proxy.passthrough import pipe_pair
from planemesh.agent.proxy.sockets import open_upstream

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import H1Request as Exchange
    from planemesh.agent.proxy.contracts import UpstreamStream as UpstreamConnection

TUNNEL_UPGRADE, TUNNEL_CONNECT = 1, 2
_perf = time.perf_counter


class Tunnel:
    __slots__ = ("down", "ex", "idle_s", "moved", "timer", "up", "up_conn")

    def __init__(self, ex: Exchange, up_conn: UpstreamConnection | None) -> None:
        self.ex = ex
        self.up_conn = up_conn  # the HTTP connection a 101 came on (None for CONNECT)
        action = ex.route.action if ex.route is not None else None
        idle = action.idle_timeout_s if action is not None else None
        self.idle_s = idle if idle else ex.ds.proxy.sla.idle_timeout_s
        self.moved = True
        self.timer: asyncio.TimerHandle | None = None
        self.down, self.up = pipe_pair(self._to_upstream, self._to_client, self._closed)

    def _to_upstream(self, n: int) -> None:
        self.ex.bytes_rx += n
        self.moved = True

    def _to_client(self, n: int) -> None:
        self.ex.relay.bytes_tx += n
        self.moved = True

    def start(self, to_upstream: bytes, client_eof: bool) -> None:
        """Both pipes have their transports except the downstream one: adopt it, send what the client sent
        while we were deciding, and pass on a FIN it sent meanwhile."""
        ex = self.ex
        ex.t_tunnel = (_perf() - ex.t0) * 1000
        ds = ex.ds
        attempt = ex.attempt
        if attempt.deadline:  # the request timeout covered opening the tunnel; now only the idle timeout applies
            ds.proxy.inflight.discard(attempt)
            attempt.deadline = attempt.try_deadline = 0.0
        ds.flush()  # the 101 or 200 goes out before any tunnel byte
        up_transport = self.up.transport
        if to_upstream and up_transport is not None:
            self._to_upstream(len(to_upstream))
            up_transport.write(to_upstream)
        self.down.adopt(ds.transport)
        if client_eof:
            self.down.eof_received()
        if self.idle_s > 0:
            self.timer = ds.proxy.loop.call_later(self.idle_s, self._idle_check)

    def _idle_check(self) -> None:
        if not self.moved:  # nothing either way for a whole period: close (between 1 and 2 idle timeouts)
            self.timer = None
            self.down.close()
            self.up.close()
            return
        self.moved = False
        self.timer = self.ex.ds.proxy.loop.call_later(self.idle_s, self._idle_check)

    def _closed(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ex = self.ex
        ex.keep_alive = False
        ex.finish()
        ex.ds.connection_lost(None)
        if self.up_conn is not None:
            self.up_conn.connection_lost(None)


def upgrade_to_tunnel(ex: Exchange, conn: UpstreamConnection, from_upstream: bytes) -> None:
    """The upstream answered 101 (its head is queued for the client): its connection becomes the tunnel."""
    conn.exchange = None
    ex.attempt.conn = None
    tunnel = Tunnel(ex, conn)
    if from_upstream:
        tunnel._to_client(len(from_upstream))
        ex.ds.out.append(from_upstream)  # sent right after the 101 head
    tunnel.up.adopt(conn.transport)
    to_upstream, client_eof = ex.ds.take_held()
    tunnel.start(to_upstream, client_eof)


def open_connect(ex: Exchange, host: str, port: int) -> None:
    """CONNECT: open the upstream to (host, port) (a name is resolved first), then 200 and the tunnel."""
    pool = ex.ds.proxy.pool
    task = ex.attempt.connect_task = pool.proxy.loop.create_task(_connect(ex, host, port))
    pool.connecting.add(task)  # cancelled by a drain's close_all, like the pool's own connects
    task.add_done_callback(pool.connecting.discard)


async def _connect(ex: Exchange, host: str, port: int) -> None:
    ds = ex.ds
    proxy = ds.proxy
    loop = proxy.loop
    attempt = ex.attempt
    timeout = attempt.connect_timeout_s
    try:
        async with asyncio.timeout(timeout):
            if not _is_ip(host):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                host = infos[0][4][0]
        source, mark = proxy.upstream_binding(host)
        sock = await open_upstream(host, port, mark=mark, source=source, timeout=timeout)
    except (OSError, TimeoutError):
        if not ex.finished:
            proxy.stats.upstream_connect_failures += 1
            attempt.end(GATEWAY_FAILURE)
            ex.keep_alive = False  # the client may already be sending tunnel bytes: never parse them as HTTP
            ex.reply(503, b"upstream connect error\n", (), flags.UF)
            ds.flush()
        return
    if ex.finished:
        sock.close()
        return
    attempt.connect_task = None
    attempt.upstream_host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    attempt.end(200)
    tunnel = Tunnel(ex, None)
    try:
        await loop.connect_accepted_socket(lambda: tunnel.up, sock)
    except BaseException:
        sock.close()
        raise
    if ex.finished:  # the client went away meanwhile
        tunnel.up.close()
        return
    relay = ex.relay
    relay.upstream_ms = int((_perf() - attempt.t_upstream) * 1000)
    relay.status = 200
    relay.started = True
    ds.out.append(CONNECT_ESTABLISHED)
    to_upstream, client_eof = ds.take_held()
    tunnel.start(to_upstream, client_eof)


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True
