"""SSL contexts from the TLS model, peer SANs, and TLS origination (no import of the proxy's codecs).

Every TLS of the product (termination, origination, HBONE) runs on the TLS engine (agent/tls/engine.py,
pyOpenSSL; keys reach OpenSSL from memory, never a file on disk); the stdlib `ssl` contexts it replaced live on
in bench/tls_stdlib.py as the benches' baseline. agent/proxy/tls.py
terminates, `originate_tls` (used by agent/proxy/upstream.py) originates: handshake on a connected socket, then
the server's SANs against the cluster's matchers (Envoy's match_typed_subject_alt_names), else the connection is
closed and the attempt fails (503 UF, counted as a connect failure).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from planemesh.agent.proxy import tls_lazy
from planemesh.model.tls_config import CertSecret, TlsContext, TrustSecret, san_accepts

if TYPE_CHECKING:  # ssl: an annotation only (a worker without TLS maps no OpenSSL: agent/lean_loop.py)
    import ssl

    from OpenSSL import SSL

    from planemesh.agent.tls.engine import TlsPeerView

log = logging.getLogger("planemesh.proxy.tls")
class TlsPeerRefused(ConnectionError):
    """The upstream's certificate verified, but none of its SANs matched the cluster's matchers."""


def uri_of(secret: object) -> str | None:
    """The SPIFFE ID of a certificate Secret's leaf (our own identity), None without one."""
    if not isinstance(secret, CertSecret):
        return None
    # Imported here: cryptography costs every worker ~9 MB of RSS, and only planes with TLS need it.
    from cryptography import x509

    from planemesh.agent.identity.ca import spiffe_ids

    try:
        ids = spiffe_ids(x509.load_pem_x509_certificate(secret.chain_pem))
    except ValueError:
        return None
    return ids[0] if ids else None


def peer_sans(ssl_object: ssl.SSLObject | TlsPeerView | None) -> tuple[list[str], list[str]]:
    """(URI SANs, DNS SANs) of the peer's certificate; empty without one."""
    if ssl_object is None:
        return [], []
    sans = getattr(ssl_object, "sans", None)
    if sans is not None:  # the TLS engine's connections (agent/tls/engine.py TlsPeerView)
        return sans()
    verified = ssl_object.getpeercert()  # parsed by OpenSSL: a tenth of cryptography's cost per handshake
    if verified:
        sans = verified.get("subjectAltName", ())
        return [v for k, v in sans if k == "URI"], [v for k, v in sans if k == "DNS"]
    der = ssl_object.getpeercert(binary_form=True)  # not verified (no trusted roots): parse it ourselves
    if not der:
        return [], []
    from cryptography import x509  # here: ~9 MB of RSS that workers without TLS do not pay

    try:
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return [], []
    return san.value.get_values_for_type(x509.UniformResourceIdentifier), san.value.get_values_for_type(x509.DNSName)


def client_context(proxy: Any, tls: TlsContext, server: bool = False) -> SSL.Context:
    """The TLS engine's context of a cluster's UpstreamTlsContext (or, `server`, of a tcp_proxy chain's
    DownstreamTlsContext) with the current snapshot's secrets, cached per value: a rotated secret is a new
    value, so new handshakes use it while open connections keep theirs."""
    secrets = proxy.table.snapshot.secrets
    cert = secrets.get(tls.cert) if tls.cert else None
    trust = secrets.get(tls.trust) if tls.trust else None
    key = ("server" if server else "client", tls, cert, trust)
    ctx = proxy.tls_client_cache.get(key)
    if ctx is None:
        if len(proxy.tls_client_cache) > 256:  # old material after many rotations: start afresh
            proxy.tls_client_cache.clear()
        ctx = proxy.tls_client_cache[key] = tls_lazy.engine().build_engine_context(tls, cert, trust, server=server)
    return ctx


async def originate_tls(
    proxy: Any, sock: socket.socket, tls: TlsContext, factory: Callable[[], Any], timeout: float, session: Any = None
) -> Any:
    """TLS over a connected upstream socket; returns the protocol made by `factory`. `session`: an earlier
    connection's session with this context to resume (the SANs are checked on a resumed session too)."""
    try:
        sock_peer = sock.getpeername()
    except OSError:
        sock_peer = "?"
    held = Held()
    try:
        ctx = client_context(proxy, tls)
        transport, _ = await tls_lazy.transport().connect_tls(
            proxy.loop, sock, lambda: held, ctx, tls.sni, timeout, session
        )
    except BaseException as exc:
        sock.close()
        if isinstance(exc, (OSError, ValueError)):  # TlsFailure is a ConnectionError
            log.info("upstream TLS to %s failed: %s", sock_peer, exc)
        raise
    trust = proxy.table.snapshot.secrets.get(tls.trust) if tls.trust else None
    matchers = tls.san + (trust.san if isinstance(trust, TrustSecret) else ())
    uris, dns = peer_sans(transport.get_extra_info("ssl_object"))
    if matchers and not san_accepts(matchers, uris, dns):
        transport.abort()
        raise TlsPeerRefused(f"upstream certificate SANs {uris + dns} match none of {len(matchers)} matchers")
    # Only now the codec sees the connection: an h2 client writes its preface and requests in connection_made,
    # and nothing may reach a server whose identity was refused.
    conn = factory()
    held.hand_over(transport, conn)
    return conn


class Held(asyncio.Protocol):
    """A finished TLS connection waiting for its identity checks: reading paused, early bytes kept in order,
    then handed to the real protocol (hand_over)."""

    def __init__(self) -> None:
        self.buffer: list[bytes] = []
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def hand_over(self, transport: Any, protocol: Any) -> None:
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        for data in self.buffer:
            protocol.data_received(data)
        if self.eof:
            protocol.eof_received()
        if self.lost:
            protocol.connection_lost(None)
        elif not transport.is_closing():
            transport.resume_reading()
