"""Istio's inbound mTLS on a sniffed (auto-protocol) port: terminate, then sniff the plaintext inside.

istiod's virtualInbound serves such a port with TLS chains (transport_protocol tls, ALPN `istio-http/1.1`,
`istio-h2`, `istio-peer-exchange`, `istio`...) and plaintext twins; planemesh merges them into one sniffed
HTTP listener with a TLS context (xds/translate_capture.py). The sniffing listener (passthrough.py) gives a
TLS ClientHello to this module when that listener's ALPN matches what the client offered (a client's own
TLS, with other ALPN, still passes through untouched): the handshake and the client's SANs are tls.py's
(`TlsChecked`), then the first decrypted bytes are classified (sniff.classify): HTTP/1.x and h2 go to the
L7 codecs over the TLS transport (peer identity and XFCC as on a declared TLS port), anything else is
relayed decrypted to the original destination, as the istio TCP chain's tcp_proxy does.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from planemesh.agent.proxy.sniff import MAX_PEEK, Kind, Verdict, classify
from planemesh.agent.proxy.tcp_tls import TlsDownstream
from planemesh.agent.proxy.tls import (
    HANDSHAKE_ERRORS,
    HANDSHAKE_TIMEOUT_S,
    TlsChecked,
    TlsDecision,
    TlsStats,
    handshake_failed,
)
from planemesh.agent.proxy.tls_context import Held
from planemesh.agent.proxy.tls_lazy import transport as tls_transport

if TYPE_CHECKING:
    from planemesh.agent.proxy.routing_table import RoutingTable

log = logging.getLogger("planemesh.proxy.tls")


def mtls_decision(table: RoutingTable, dst: tuple[str, int], verdict: Verdict) -> TlsDecision | None:
    """The TLS context to terminate this ClientHello with: a sniffed listener's TLS chain whose ALPN the client
    offered, else the plane's own mTLS (SLA strict: every ClientHello; permissive: every one but a client's own
    TLS next to such a chain, which passes through as xDS says; neither to an OUTBOUND listener's destination,
    TlsRoutes.mode_for); None when neither (passed through)."""
    if verdict.kind is not Kind.TLS:
        return None
    routes = table.tls
    decision = routes.decide(*dst) if routes.ports else None
    mode = routes.mode_for(*dst)
    if decision is not None and decision.listener.sniff:
        wanted = decision.listener.application_protocols
        if not wanted or set(wanted) & set(verdict.alpn):
            return decision
        if mode != "strict":
            return None
    return routes.plane_decision(dst[1]) if mode else None


def plane_refuses(stats: TlsStats, mode: str, verdict: Verdict, where: str, port: int) -> bool:
    """A sniffed connection that did not start with a ClientHello, on a plane whose SLA says strict: closed
    before anything is sniffed or relayed (counted, logged). Permissive: counted as plaintext accepted."""
    if verdict.kind is Kind.TLS or mode not in ("strict", "permissive"):
        return False
    if mode == "permissive":
        stats.plaintext_accepted += 1
        return False
    stats.plaintext_refused += 1
    log.info("%s: plaintext to port %s on a strict plane: closed", where, port)
    return True


class _InnerSniff(asyncio.Protocol):
    """The first protocol inside the terminated TLS: buffers until classify() decides (or `timeout_s`,
    or EOF), then hands the transport to the HTTP codec or to `relay`."""

    def __init__(self, proxy: Any, timeout_s: float, relay: Callable[[Any, bytes, bool], None]) -> None:
        self.proxy = proxy
        self.timeout_s = timeout_s
        self.relay = relay  # (transport, early bytes, eof) -> None: the opaque path
        self.transport: Any = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.timer = self.proxy.loop.call_later(self.timeout_s, self._decide, True)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._decide(len(self.buffer) >= MAX_PEEK)

    def eof_received(self) -> bool:
        self._decide(True, eof=True)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.done = True

    def _decide(self, final: bool, eof: bool = False) -> None:
        if self.done:
            return
        verdict = classify(self.buffer, final=final)
        if verdict is None:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.proxy.sniff_stats.inner_kinds[verdict.kind.value] += 1
        transport, data = self.transport, self.buffer
        if verdict.kind is Kind.HTTP1:
            ds = self.proxy.http1_protocol()
        elif verdict.kind is Kind.H2:
            ds = self.proxy.h2_protocol(preread=data)
            data = b""
        else:
            self.relay(transport, data, eof)
            return
        transport.set_protocol(ds)
        ds.connection_made(transport)
        if data:
            ds.data_received(data)
        if eof:
            ds.eof_received()


async def terminate_and_sniff(
    proxy: Any,
    conn: socket.socket,
    decision: TlsDecision,
    where: str,
    timeout_s: float,
    relay: Callable[[TlsDownstream], None],
) -> bool:
    """The server handshake on a sniffed connection, then _InnerSniff; False when the handshake failed
    (counted, logged, closed). `relay(down: TlsDownstream)` starts relaying a connection not HTTP inside."""

    def opaque(transport: Any, data: bytes, eof: bool) -> None:
        held = Held()  # the relay adopts the transport with what was read already, in order
        held.buffer = [data] if data else []
        held.eof = eof
        transport.set_protocol(held)
        transport.pause_reading()
        ssl_object = transport.get_extra_info("ssl_object")
        relay(TlsDownstream(transport, held, getattr(ssl_object, "planemesh_peer", None)))

    port = decision.listener.port
    proxy.tls_pending += 1  # a handshake in progress holds a place in the plane's budget
    try:
        checked = lambda: TlsChecked(proxy, decision, lambda: _InnerSniff(proxy, timeout_s, opaque))  # noqa: E731
        await tls_transport().accept_tls(proxy.loop, conn, checked, decision.context, HANDSHAKE_TIMEOUT_S)
    except HANDSHAKE_ERRORS as exc:
        handshake_failed(proxy.tls_stats, exc, where, port)
        conn.close()
        return False
    finally:
        proxy.tls_pending -= 1
    return True
