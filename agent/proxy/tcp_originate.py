"""TLS origination for relayed TCP (Istio auto-mTLS for tcp_proxy chains), the client side of a relay.

A tcp_proxy chain relayed by the sniffing listener (agent/proxy/passthrough.py) connects to an endpoint of its
cluster; the endpoint's transport socket decides plaintext or TLS, as for HTTP (model/tls_config.py
`endpoint_tls`: the first `transport_socket_matches` entry whose labels the endpoint's metadata holds, istiod's
`tlsMode: istio` -> mTLS with SDS `default`/`ROOTCA`, else the cluster's `transport_socket`). The handshake runs
on the TLS engine and the server's SANs are checked before a byte of the client's is sent
(agent/proxy/tls_context.py `originate_tls`, shared with HTTP origination). A refused server (wrong SAN, foreign
CA, expired certificate, no TLS, a handshake that times out) is counted (`TcpOriginStats`), logged, and the
client's connection is closed: the relay never starts.

The relay keeps its semantics over TLS: back-pressure through the transports' pause/resume, and half-close
(the client's FIN becomes our close_notify and FIN while the server's answer is still read: the transport's
`allow_half_close`, agent/tls/transport.py).

Sessions are resumed, as Envoy's upstream TLS does by default (`max_session_keys` 1): each relay keeps its
connection's session (per TLS context, secrets and server address) once the server's first bytes or EOF came
(a TLS 1.3 ticket comes before them), and the next connection to that server offers it. A resumed session
still carries the server's certificate: its SANs are checked as on a full handshake.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from planemesh.agent.proxy.tls_context import Held, TlsPeerRefused, originate_tls
from planemesh.model.config import Cluster, Endpoint
from planemesh.model.tls_config import TlsContext, any_tls, endpoint_tls

log = logging.getLogger("planemesh.proxy.tls")


SESSIONS = "tcp_origin_sessions"  # the sessions' dict, kept in proxy.tls_client_cache (cleared with it)
MAX_SESSIONS = 1024  # servers whose session is kept; then the dict starts afresh


class TcpOriginStats:
    """TLS origination of relayed TCP connections (per plane worker)."""

    __slots__ = ("failed", "handshakes", "resumed", "san_refused", "timeouts")

    def __init__(self) -> None:
        self.handshakes = 0  # finished, the server's identity accepted
        self.resumed = 0  # of those, resumed sessions (no certificate signature or chain check)
        self.failed = 0  # every refusal, the two below included (handshake errors, wrong CA, expired, reset)
        self.san_refused = 0  # verified, but no SAN matched the cluster's matchers
        self.timeouts = 0  # no finished handshake within the connect timeout

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def origin_tls(cluster: Cluster | None, endpoint: Endpoint | None, addr: tuple[str, int]) -> TlsContext | None:
    """The TLS context of a relayed connection to `addr` (an endpoint of `cluster`, or the original destination
    of an ORIGINAL_DST cluster); None: plaintext."""
    if cluster is None or not any_tls(cluster):
        return None
    return endpoint_tls(cluster, endpoint, addr)


async def attach(up: socket.socket | TlsUpstream, end: asyncio.Protocol) -> None:
    """A relay's upstream end (agent/proxy/passthrough.py): a connected socket, or a TLS connection originated here."""
    if isinstance(up, TlsUpstream):
        up.adopt(end)
    else:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: end, up)


class _Parked(Held):
    """Held (tls_context.py) that also keeps the transport, until a relay end adopts it."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        super().connection_made(transport)


class _SessionTap(asyncio.Protocol):
    """The TLS transport's protocol until the server's first bytes, its EOF or the end: then the connection's
    session is kept (a TLS 1.3 ticket precedes them) and the relay's end takes the transport over."""

    def __init__(self, end: asyncio.Protocol, keep: Callable[[Any], None]) -> None:
        self.end, self.keep = end, keep
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.end.connection_made(transport)

    def _kept(self, hand_over: bool = True) -> None:
        if self.transport is not None:
            self.keep(self.transport.get_extra_info("ssl_session"))
            if hand_over:
                self.transport.set_protocol(self.end)
            self.transport = None

    def data_received(self, data: bytes) -> None:
        self._kept()
        self.end.data_received(data)

    def eof_received(self) -> bool | None:
        self._kept()
        return self.end.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._kept(hand_over=False)  # the transport is gone: nothing to hand over
        self.end.connection_lost(exc)

    def pause_writing(self) -> None:
        self.end.pause_writing()

    def resume_writing(self) -> None:
        self.end.resume_writing()


class TlsUpstream:
    """An upstream connection over TLS, handshake done and identity checked, reading paused until `adopt`."""

    __slots__ = ("keep", "parked")

    def __init__(self, parked: _Parked, keep: Callable[[Any], None]) -> None:
        self.parked = parked
        self.keep = keep

    def adopt(self, protocol: asyncio.Protocol) -> None:
        """Hand the connection to `protocol` (one end of the relay's pipe pair): bytes and EOF the server sent
        meanwhile first, then reading resumes."""
        transport = self.parked.transport
        self.parked.hand_over(transport, _SessionTap(protocol, self.keep))
        if not transport.is_closing():
            transport.resume_reading()

    def close(self) -> None:
        self.parked.transport.close()


def _sessions(proxy: Any, tls: TlsContext, addr: tuple[str, int]) -> tuple[dict, tuple]:
    """The proxy's kept sessions and this connection's key: the context, its secrets' material (a rotated
    certificate must not resume the old identity's session) and the server."""
    cache = proxy.tls_client_cache
    sessions = cache.get(SESSIONS)
    if sessions is None or len(sessions) >= MAX_SESSIONS:
        sessions = cache[SESSIONS] = {}
    secrets = proxy.table.snapshot.secrets
    cert = secrets.get(tls.cert) if tls.cert else None
    trust = secrets.get(tls.trust) if tls.trust else None
    return sessions, (tls, cert, trust, addr)


async def originate(
    proxy: Any, sock: socket.socket, tls: TlsContext, timeout: float, stats: TcpOriginStats, addr: tuple[str, int]
) -> TlsUpstream:
    """The client handshake on a connected upstream socket to `addr` (closed on failure), resuming the last
    session with that server. Raises ConnectionError or TimeoutError, counted in `stats` and logged."""
    sessions, key = _sessions(proxy, tls, addr)
    try:
        parked = await _handshake(proxy, sock, tls, timeout, stats, sessions.get(key))
    except BaseException:
        sessions.pop(key, None)  # not offered again (a refused server, a failed resumption)
        raise
    transport = parked.transport
    transport.allow_half_close()
    stats.handshakes += 1
    if transport.get_extra_info("ssl_object").session_reused():
        stats.resumed += 1

    def keep(session: Any) -> None:
        if session is not None:
            sessions[key] = session

    return TlsUpstream(parked, keep)


async def _handshake(
    proxy: Any, sock: socket.socket, tls: TlsContext, timeout: float, stats: TcpOriginStats, session: Any
) -> _Parked:
    try:
        return await originate_tls(proxy, sock, tls, _Parked, timeout, session)
    except TlsPeerRefused as exc:  # the handshake's own failures were logged by originate_tls
        stats.failed += 1
        stats.san_refused += 1
        log.warning("relayed TCP: %s: closed", exc)
        raise
    except TimeoutError:
        stats.failed += 1
        stats.timeouts += 1
        raise
    except (OSError, ValueError) as exc:  # the engine's TlsFailure is a ConnectionError; a bad secret a ValueError
        stats.failed += 1
        raise ConnectionError(str(exc)) from exc
