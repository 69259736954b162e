"""TLS material for HBONE: a client certificate per source workload, a server certificate for the node.

As ztunnel does, the source node presents the *source workload's* certificate (its SPIFFE ID is what the
destination authorizes), so connections are pooled per (source identity, peer node). The node's own
certificate serves its HBONE listener. Both come from a `CertSource`; `CaCertSource` issues them from the
built-in CA (agent/identity/ca.py: a per-node intermediate, Istio's `cacerts` layout) and re-issues each at
half its lifetime (istio-agent's rotation point). In a cluster the same protocol would be fed by istiod's
CreateCertificate (ztunnel's node-trusted CSR path): agent/hbone/csr_certs.py.

The contexts are the TLS engine's (agent/tls/engine.py: pyOpenSSL over the cryptography wheel's OpenSSL, the
proxy's TLS stack too); a new certificate is a new context, so open connections keep theirs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from OpenSSL import SSL

from planemesh.agent.hbone.protocol import ALPN
from planemesh.agent.identity.ca import CertificateAuthority, Issued, utcnow
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.agent.tls.engine import build_engine_context
from planemesh.model.tls_config import CertSecret, TlsContext, TrustSecret

# ztunnel speaks TLS 1.3 only on HBONE; so do we (Envoy's HBONE terminator accepts it).
HBONE_TLS = TlsContext(alpn=(ALPN,), min_version="TLSv1_3", max_version="TLSv1_3", require_client_cert=True)
DEFAULT_TTL_S = 24 * 3600.0


class CertSource(Protocol):
    def client_context(self, identity: str) -> SSL.Context: ...

    def server_context(self) -> SSL.Context: ...


@dataclass
class _Held:
    issued: Issued
    context: SSL.Context
    renew_at: dt.datetime


class CaCertSource:
    """Contexts from a signing CA held in memory; keys never touch the disk (OpenSSL reads them from memory)."""

    def __init__(
        self,
        ca: CertificateAuthority,
        node_identity: str,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.ca = ca
        self.node_identity = str(parse_spiffe_id(node_identity))
        self.ttl_s = ttl_s
        self.clock = clock
        self.trust = TrustSecret(ca.root_pem())
        self._client: dict[str, _Held] = {}
        self._server: _Held | None = None
        self.issued = 0

    def _issue(self, identity: str, server: bool) -> _Held:
        now = self.clock()
        issued = self.ca.issue(parse_spiffe_id(identity), now=now, ttl_s=self.ttl_s)
        self.issued += 1
        secret = CertSecret(issued.cert_chain_pem(), issued.key_pem())
        context = build_engine_context(HBONE_TLS, secret, self.trust, server=server)
        half = (issued.not_after - issued.not_before) / 2
        return _Held(issued, context, issued.not_before + half)

    def client_context(self, identity: str) -> SSL.Context:
        held = self._client.get(identity)
        if held is None or self.clock() >= held.renew_at:
            held = self._client[identity] = self._issue(identity, server=False)
        return held.context

    def server_context(self) -> SSL.Context:
        if self._server is None or self.clock() >= self._server.renew_at:
            self._server = self._issue(self.node_identity, server=True)
        return self._server.context

    def renewal_due(self, identity: str) -> dt.datetime | None:
        held = self._client.get(identity)
        return held.renew_at if held else None
