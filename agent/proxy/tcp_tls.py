"""TLS termination on tcp_proxy chains (Istio's mTLS for TCP services): handshake, the client's SANs checked,
then the decrypted bytes relayed (passthrough.py relay_tls) to the chain upstream in plaintext, with half-close.

The sniffing listener (agent/proxy/passthrough.py) selects the chain by destination, SNI and transport
(a TLS ClientHello goes to the chain that terminates TLS; plaintext to its raw_buffer twin, or is refused
on a TLS-only port: `plaintext_refused`). Between the handshake and the relay the connection is held with
reading paused, so network RBAC can decide with the client's SPIFFE ID before a byte reaches the upstream.
Handshake failures, SAN refusals and timeouts are counted in the plane's TlsStats like HTTP chains'.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any

from planemesh.agent.proxy.tls import HANDSHAKE_ERRORS, HANDSHAKE_TIMEOUT_S, check_peer, handshake_failed, spiffe_of
from planemesh.agent.proxy.tls_context import Held, client_context
from planemesh.agent.proxy.tls_lazy import transport as tls_transport
from planemesh.model.tls_config import TlsContext


@dataclass(slots=True)
class TcpRecord:
    """An access-log record of a relayed connection of a chain that terminated TLS (accesslog.AccessRecord's
    fields; method/path "-", protocol "TCP", status 0), its client's SPIFFE ID read like an HTTP request's."""

    start_time: float
    bytes_rx: int
    bytes_tx: int
    duration_ms: int
    upstream_host: str | None
    plane: str
    ds: Any  # .transport: the TLS connection (accesslog.peer_identity)
    flags: str = ""
    method: str = "-"
    path: str = "-"
    protocol: str = "TCP"
    status: int = 0
    upstream_ms: int | None = None
    xff: str | None = None
    user_agent: str | None = None
    request_id: str | None = None
    authority: str | None = None


@dataclass(slots=True)
class TlsDownstream:
    """A terminated client connection: its transport, what it sent early, its SPIFFE ID (None: no certificate)."""

    transport: asyncio.Transport
    held: Held
    peer: str | None

    def refuse(self) -> None:
        self.transport.abort()

    def adopt_into(self, pipe: Any) -> None:
        """Hand the connection to the relay's downstream end (passthrough.py's pipe), early bytes first."""
        self.held.hand_over(self.transport, pipe)


async def terminate(proxy: Any, conn: socket.socket, tls: TlsContext, where: str, port: int) -> TlsDownstream | None:
    """The server handshake on an accepted socket; None when it failed or the SANs were refused (counted,
    logged, the connection closed)."""
    held = Held()
    try:
        context = client_context(proxy, tls, server=True)
        transport, _ = await tls_transport().accept_tls(proxy.loop, conn, lambda: held, context, HANDSHAKE_TIMEOUT_S)
    except (*HANDSHAKE_ERRORS, ValueError) as exc:  # ValueError: a context that cannot be built from the secrets
        handshake_failed(proxy.tls_stats, exc, where, port)
        conn.close()
        return None
    checked = check_peer(proxy, tls, transport)
    if checked is None:
        return None
    peer = spiffe_of(checked[0])
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is not None:
        ssl_object.planemesh_peer = peer  # the access log's peer identity (accesslog.peer_identity)
    return TlsDownstream(transport, held, peer)  # type: ignore[arg-type]
