"""HBONE's TLS material from a CA speaking istio's CreateCertificate (istiod, or `planemesh xds-server --ca`).

One `CertificateClient` (agent/identity/cert_client.py) per identity the node needs: its own (the 15008
listener's certificate) and each local workload's (the client certificate it presents for that workload, as
ztunnel does). Each makes its key and CSR in memory, asks the CA, checks the answer and renews at half-life;
a new certificate gives a new context (new handshakes use it, open connections keep theirs). The peers are
verified against the roots the CA returned. The CA must let the node's token ask for its workloads'
identities (istiod: `CA_TRUSTED_NODE_ACCOUNTS`; `planemesh xds-server` tokens file: `*`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from OpenSSL import SSL

from planemesh.agent.hbone.certs import HBONE_TLS
from planemesh.agent.identity.cert_client import CaSettings, CertificateClient
from planemesh.agent.identity.csr import WorkloadCert
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.agent.tls.engine import build_engine_context
from planemesh.agent.tls.failure import TlsFailure
from planemesh.aio import stop_tasks
from planemesh.model.tls_config import CertSecret, TrustSecret

log = logging.getLogger("planemesh.hbone")


class NoCertificate(TlsFailure):
    """No certificate yet for an identity (the CA has not answered): the tunnel is refused, `connect_failed`."""


class CsrCertSource:
    def __init__(self, settings: CaSettings, node_identity: str, workload_identities: Iterable[str]) -> None:
        self.settings = settings
        self.node_identity = str(parse_spiffe_id(node_identity))
        self.clients: dict[str, CertificateClient] = {}
        self._client_ctx: dict[str, SSL.Context] = {}
        self._server_ctx: SSL.Context | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.want([self.node_identity, *workload_identities])

    def _changed_cb(self, identity: str):  # type: ignore[no-untyped-def]
        async def changed(cert: WorkloadCert) -> None:
            secret = CertSecret(cert.cert_chain_pem(), cert.key_pem())
            trust = TrustSecret(cert.roots_pem())
            self._client_ctx[identity] = build_engine_context(HBONE_TLS, secret, trust, server=False)
            if identity == self.node_identity:
                self._server_ctx = build_engine_context(HBONE_TLS, secret, trust, server=True)

        return changed

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start every client; return once the node's own certificate is in (TimeoutError otherwise)."""
        self._tasks = [asyncio.create_task(c.run(), name=f"cert-{i}") for i, c in self.clients.items()]
        async with asyncio.timeout(timeout_s):
            await self.clients[self.node_identity].ready.wait()

    def want(self, identities: Iterable[str]) -> None:
        """A client for each identity not yet served: the configured ones, and local workloads' learned later
        (WDS), started now once `start` ran."""
        for identity in identities:
            if identity in self.clients:
                continue
            client = self.clients[identity] = CertificateClient(
                self.settings, parse_spiffe_id(identity), self._changed_cb(identity)
            )
            if self._tasks:
                self._tasks.append(asyncio.create_task(client.run(), name=f"cert-{identity}"))

    def client_context(self, identity: str) -> SSL.Context:
        ctx = self._client_ctx.get(identity)
        if ctx is None:
            client = self.clients.get(identity)
            why = client.last_error if client is not None else "not a local workload"
            raise NoCertificate(f"no certificate for {identity} yet: {why}")
        return ctx

    def server_context(self) -> SSL.Context:
        if self._server_ctx is None:
            raise NoCertificate(f"no certificate for the node {self.node_identity} yet")
        return self._server_ctx

    def status(self) -> dict[str, dict]:
        return {i: c.status() for i, c in self.clients.items()}

    async def close(self) -> None:
        await stop_tasks(*self._tasks)
