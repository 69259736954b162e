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
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from planemesh.agent.proxy.tls_context import Held, TlsPeerRefused, originate_tls
from planemesh.model.config import Cluster, Endpoint
from planemesh.model.tls_config import TlsContext, any_tls, endpoint_tls

log = logging.getLogger("planemesh.proxy.tls")


class TcpOriginStats:
    """TLS origination of relayed TCP connections (per plane worker)."""

    __slots__ = ("failed", "handshakes", "san_refused", "timeouts")

    def __init__(self) -> None:
        self.handshakes = 0  # finished, the server's identity accepted
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


class _Parked(Held):
    """Held (tls_context.py) that also keeps the transport, until a relay end adopts it."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        super().connection_made(transport)


class TlsUpstream:
    """An upstream connection over TLS, handshake done and identity checked, reading paused until `adopt`."""

    __slots__ = ("parked",)

    def __init__(self, parked: _Parked) -> None:
        self.parked = parked

    def adopt(self, protocol: asyncio.Protocol) -> None:
        """Hand the connection to `protocol` (one end of the relay's pipe pair): bytes and EOF the server sent
        meanwhile first, then reading resumes."""
        transport = self.parked.transport
        self.parked.hand_over(transport, protocol)
        if not transport.is_closing():
            transport.resume_reading()

    def close(self) -> None:
        self.parked.transport.close()


async def originate(
    proxy: Any, sock: socket.socket, tls: TlsContext, timeout: float, stats: TcpOriginStats
) -> TlsUpstream:
    """The client handshake on a connected upstream socket (closed on failure). Raises ConnectionError or
    TimeoutError, counted in `stats` and logged."""
    try:
        parked = await originate_tls(proxy, sock, tls, _Parked, timeout)
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
    transport = parked.transport
    transport.allow_half_close()
    stats.handshakes += 1
    return TlsUpstream(parked)
