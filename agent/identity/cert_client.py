"""The workload certificate from a CA speaking istio's CreateCertificate (istiod, or `planemesh xds-server
--ca`), fetched and rotated as istio-agent does.

    client = CertificateClient(CaSettings(address="istiod.istio-system.svc:15012", root_cert="/etc/root.pem",
                                          token_file="/var/run/secrets/tokens/istio-token"), spiffe_id, on_change)
    await client.run()        # forever: CSR -> certificate, again at half-life; retries with backoff

Each fetch makes a new P-256 key and CSR in memory (agent/identity/csr.py); the key is never written
anywhere. The channel is TLS verified with the CA's root certificate (`root_cert`; plaintext only when
it is unset, e.g. a unix socket in a lab), and the call carries `authorization: Bearer <token>` read from
`token_file` on every call (Kubernetes rotates projected tokens). A refused call or a response that does
not check out is logged with the reason, counted, retried, and the current certificate stays in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from planemesh.agent import lazy_modules
from planemesh.agent.identity.cert_types import DEFAULT_WORKLOAD_TTL_S, CertError, utcnow
from planemesh.agent.identity.istio_ca_proto import METHOD, IstioCertificateRequest, IstioCertificateResponse
from planemesh.agent.identity.spiffe import SpiffeId
from planemesh.xds.grpc_channel import Channel, tls_context
from planemesh.xds.grpc_wire import RpcError

if TYPE_CHECKING:
    from planemesh.agent.identity.csr import WorkloadCert

log = logging.getLogger("planemesh.identity.cert_client")
CALL_TIMEOUT_S = 10.0  # one CreateCertificate; istio-agent's CSR call has a comparable deadline
RETRY_BASE_S, RETRY_MAX_S = 0.5, 30.0  # backoff between failed fetches


@dataclass(frozen=True, slots=True)
class CaSettings:
    address: str  # host:port or unix:///path
    root_cert: str | None = None  # PEM file: the CA server's root; None = plaintext channel
    server_name: str | None = None  # TLS name to verify (istiod: istiod.istio-system.svc)
    token_file: str | None = None  # `authorization: Bearer <token>`
    ttl_s: float = DEFAULT_WORKLOAD_TTL_S  # validity_duration asked for
    cluster_id: str | None = None  # metadata ClusterID (istio-agent sends it for multi-cluster CAs)


class FetchError(Exception):
    """One CreateCertificate failed; the message says why (the server's status or the response's fault)."""


def _token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise FetchError(f"token_file {path}: cannot read: {exc.strerror}") from None
    if not token or any(c in token for c in "\r\n\0 "):
        raise FetchError(f"token_file {path}: empty or not a single-line token")
    return token


def _channel(settings: CaSettings) -> Channel:
    if settings.root_cert is None:
        return Channel(settings.address, keepalive_s=0)
    try:
        root = Path(settings.root_cert).read_bytes()
    except OSError as exc:
        raise FetchError(f"root_cert {settings.root_cert}: cannot read: {exc.strerror}") from None
    try:
        context = tls_context(root)
    except (ValueError, ssl.SSLError) as exc:
        raise FetchError(f"root_cert {settings.root_cert}: not a usable PEM certificate: {exc}") from None
    return Channel(settings.address, tls=context, server_name=settings.server_name, keepalive_s=0)


async def create_certificate(settings: CaSettings, spiffe_id: SpiffeId, now: dt.datetime) -> WorkloadCert:
    """One CSR round trip: a new key, the CA's signature, the answer checked. FetchError on any failure."""
    csr = lazy_modules.load("planemesh.agent.identity.csr")  # cryptography: only once a certificate is asked for
    key, csr_pem = csr.new_csr(spiffe_id)
    request = IstioCertificateRequest(csr=csr_pem.decode(), validity_duration=int(settings.ttl_s))
    if settings.cluster_id:
        request.metadata.update({"ClusterID": settings.cluster_id})
    metadata = (("authorization", f"Bearer {_token(settings.token_file)}"),) if settings.token_file else ()
    async with _channel(settings) as channel:
        try:
            response = await channel.unary(METHOD, request, IstioCertificateResponse.FromString, metadata=metadata,
                                           timeout_s=CALL_TIMEOUT_S)  # fmt: skip
        except RpcError as exc:
            raise FetchError(f"CreateCertificate: {exc.code().name}: {exc.details()}") from None
    try:
        return csr.accept_chain(list(response.cert_chain), list(response.root_cert.ca_cert), key, spiffe_id, now)
    except CertError as exc:
        raise FetchError(str(exc)) from None


class CertificateClient:
    """Keeps one workload certificate current; `on_change(cert)` after every new one."""

    def __init__(
        self,
        settings: CaSettings,
        spiffe_id: SpiffeId,
        on_change: Callable[[WorkloadCert], Awaitable[None]],
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.settings, self.spiffe_id, self._on_change = settings, spiffe_id, on_change
        self.clock = clock  # the validity checks and the rotation schedule (tests shift it)
        self._rng = rng or random.Random()
        self.current: WorkloadCert | None = None
        self.ready = asyncio.Event()  # set once the first certificate is in
        self._renew = asyncio.Event()
        self.fetched = 0
        self.failures = 0
        self.last_error: str | None = None

    def status(self) -> dict:
        cert = self.current
        return {
            "ca": self.settings.address,
            "identity": str(self.spiffe_id),
            "not_after": cert.not_after.isoformat() if cert else None,
            "rotate_at": cert.rotate_at.isoformat() if cert else None,
            "fetched": self.fetched,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    def stats_row(self) -> dict:
        """An agent.metrics.WorkloadCertStats row."""
        cert = self.current
        return {
            "identity": str(self.spiffe_id),
            "not_after_s": cert.not_after.timestamp() if cert else 0.0,
            "fetched": self.fetched,
            "failures": self.failures,
        }

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                cert = await create_certificate(self.settings, self.spiffe_id, self.clock())
            except FetchError as exc:
                self.failures += 1
                self.last_error = str(exc)
                cap = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** min(attempt, 10))
                attempt += 1
                log.error("workload certificate for %s: %s (retry in <= %.1fs)", self.spiffe_id, exc, cap)
                await asyncio.sleep(cap / 2 + self._rng.uniform(0, cap / 2))
                continue
            attempt = 0
            self.current, self.last_error = cert, None
            self.fetched += 1
            log.info("workload certificate %s until %s, rotation at %s", cert.spiffe_id, cert.not_after, cert.rotate_at)
            await self._on_change(cert)
            self.ready.set()
            self._renew.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, (cert.rotate_at - self.clock()).total_seconds())):
                    await self._renew.wait()

    def renew_now(self) -> None:
        """Ask for a new certificate now instead of at half-life (operators, tests)."""
        self._renew.set()


__all__ = ["CaSettings", "CertificateClient", "FetchError", "create_certificate"]
