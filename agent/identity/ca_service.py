"""istio's CreateCertificate served from the built-in CA (what istiod's CA server does), for labs and nodes
without istiod, so workloads get certificates by the standard CSR flow end to end.

    signer = CsrSigner(ca, tokens={"tok-amf": istio_identity("cluster.local", "ran", "amf")}, ttl_s=3600)
    server.add_generic_rpc_handlers((certificate_service(signer),))    # agent/identity/ca_grpc.py

Authentication is istiod's shape: `authorization: Bearer <token>` on the call. istiod reviews a Kubernetes
JWT and signs for the service account it names; here a token file maps each token to the one identity it
may ask for (`*`: any identity of the trust domain, for a lab's single shared token). The CSR must be a valid
signed request for exactly that identity (istiod: the caller must be authorized for every SAN of the CSR).
Refusals: no/unknown token -> UNAUTHENTICATED, a broken CSR or TTL -> INVALID_ARGUMENT, an identity the
token does not own -> PERMISSION_DENIED; each counted and logged with the reason.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization

from planemesh.agent.identity.ca import (
    DEFAULT_WORKLOAD_TTL_S,
    MAX_WORKLOAD_TTL_S,
    CertError,
    CertificateAuthority,
    csr_identity,
    utcnow,
)
from planemesh.agent.identity.istio_ca_proto import IstioCertificateRequest, IstioCertificateResponse
from planemesh.agent.identity.spiffe import SpiffeError, SpiffeId, istio_identity
from planemesh.model.config import ConfigError
from planemesh.xds.grpc_wire import StatusCode

log = logging.getLogger("planemesh.identity.ca_service")
T = TypeVar("T")
ANY_IDENTITY = None  # a token that may ask for any identity of the trust domain (`*` in the token file)
MAX_CSR_BYTES = 16 << 10  # a P-256 CSR is ~500 bytes; anything far larger is not one


class CsrRefused(Exception):
    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class CsrSigner:
    """Sign CSRs for authenticated callers (no I/O)."""

    ca: CertificateAuthority
    tokens: Mapping[str, SpiffeId | None]
    ttl_s: float = DEFAULT_WORKLOAD_TTL_S
    clock: Callable[[], dt.datetime] = utcnow
    signed: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # reason (grpc code name) -> count

    def sign(self, request: IstioCertificateRequest, authorization: str | None) -> IstioCertificateResponse:
        try:
            return self._sign(request, authorization)
        except CsrRefused as exc:
            self.refused[exc.code.name] = self.refused.get(exc.code.name, 0) + 1
            log.warning("CreateCertificate refused (%s): %s", exc.code.name, exc)
            raise

    def _sign(self, request: IstioCertificateRequest, authorization: str | None) -> IstioCertificateResponse:
        allowed = self._authenticate(authorization)
        ttl = float(request.validity_duration) if request.validity_duration > 0 else self.ttl_s
        if request.validity_duration < 0 or ttl > MAX_WORKLOAD_TTL_S:
            raise CsrRefused(
                StatusCode.INVALID_ARGUMENT,
                f"validity_duration {request.validity_duration}s: expected 1 .. {MAX_WORKLOAD_TTL_S}",
            )
        csr = request.csr.encode("utf-8", "replace")
        if len(csr) > MAX_CSR_BYTES:
            raise CsrRefused(StatusCode.INVALID_ARGUMENT, f"csr: {len(csr)} bytes, at most {MAX_CSR_BYTES}")
        try:
            spiffe_id, public_key = csr_identity(csr)
            if allowed is not ANY_IDENTITY and spiffe_id != allowed:
                raise CsrRefused(
                    StatusCode.PERMISSION_DENIED, f"the token may ask for {allowed}, the CSR asks for {spiffe_id}"
                )
            issued = self.ca.issue(spiffe_id, now=self.clock(), ttl_s=ttl, public_key=public_key)
        except CertError as exc:
            raise CsrRefused(StatusCode.INVALID_ARGUMENT, str(exc)) from None
        self.signed += 1
        log.info("CreateCertificate: signed %s until %s", issued.spiffe_id, issued.not_after.isoformat())
        # istiod's classic shape: one PEM per entry, leaf first, the root last (no root_cert field).
        certs = (issued.cert, *(c for c in issued.chain if c != self.ca.root))
        chain = [c.public_bytes(serialization.Encoding.PEM).decode() for c in certs]
        return IstioCertificateResponse(cert_chain=[*chain, self.ca.root_pem().decode()])

    def _authenticate(self, authorization: str | None) -> SpiffeId | None:
        if authorization is None:
            raise CsrRefused(StatusCode.UNAUTHENTICATED, "no `authorization: Bearer <token>` metadata")
        scheme, _, token = authorization.partition(" ")
        if scheme != "Bearer" or not token:
            raise CsrRefused(StatusCode.UNAUTHENTICATED, "authorization metadata is not `Bearer <token>`")
        if token not in self.tokens:
            raise CsrRefused(StatusCode.UNAUTHENTICATED, "unknown bearer token")
        return self.tokens[token]


def read_token_lines(path: Path, identity: Callable[[str], T]) -> dict[str, T | None]:
    """Lines `TOKEN IDENTITY` (or `TOKEN *`: any identity, None); `#` comments. `identity` turns the IDENTITY word
    into a value or raises ValueError; ConfigError naming the file and line. The CA's --ca-tokens and the xDS
    server's --xds-tokens (xds/server_auth.py)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    tokens: dict[str, T | None] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{path}:{number}"
        if len(words) != 2:
            raise ConfigError(where, "expected `TOKEN NAMESPACE/SERVICE_ACCOUNT` or `TOKEN *`")
        token, who = words
        try:
            tokens[token] = ANY_IDENTITY if who == "*" else identity(who)
        except ValueError as exc:
            raise ConfigError(where, str(exc)) from None
    if not tokens:
        raise ConfigError(str(path), "no token")
    return tokens


def read_token_file(path: Path, trust_domain: str) -> dict[str, SpiffeId | None]:
    """Lines `TOKEN NAMESPACE/SERVICE_ACCOUNT` (or `TOKEN *`); `#` comments. ConfigError naming the line."""

    def identity(who: str) -> SpiffeId:
        namespace, slash, account = who.partition("/")
        if not slash:
            raise SpiffeError(f"{who!r}: expected NAMESPACE/SERVICE_ACCOUNT")
        return istio_identity(trust_domain, namespace, account)

    return read_token_lines(path, identity)


__all__ = ["CsrRefused", "CsrSigner", "read_token_file", "read_token_lines"]
