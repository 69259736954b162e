"""SPIFFE IDs as Istio writes them: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>."""

from __future__ import annotations

import re
from dataclasses import dataclass

# SPIFFE spec: trust domain lower-case letters, digits, '.', '-', '_'; path segments of unreserved chars.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,253}")
MAX_ID_LENGTH = 2048  # SPIFFE: an ID is at most 2048 bytes


class SpiffeError(ValueError):
    """A string is not a SPIFFE ID of the accepted shape; the message says why."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # "/ns/default/sa/web" ("" for the trust domain itself)

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @property
    def namespace(self) -> str | None:
        return self._istio_part("ns")

    @property
    def service_account(self) -> str | None:
        return self._istio_part("sa")

    def _istio_part(self, key: str) -> str | None:
        parts = self.path.split("/")[1:]
        if len(parts) == 4 and parts[0] == "ns" and parts[2] == "sa":
            return parts[1] if key == "ns" else parts[3]
        return None


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse and validate (scheme, trust domain, path segments; no query, fragment, port or user info)."""
    if not isinstance(text, str) or not text.startswith("spiffe://"):
        raise SpiffeError(f"{text!r}: a SPIFFE ID starts with spiffe://")
    if len(text) > MAX_ID_LENGTH:
        raise SpiffeError(f"SPIFFE ID longer than {MAX_ID_LENGTH} bytes")
    rest = text[len("spiffe://") :]
    domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise SpiffeError(f"{text!r}: trust domain {domain!r} must be lower-case letters, digits, '.', '-', '_'")
    if not slash:
        return SpiffeId(domain, "")
    for segment in path.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise SpiffeError(f"{text!r}: path segment {segment!r} is empty, dot-only or has a reserved character")
    return SpiffeId(domain, "/" + path)


def istio_identity(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    """spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, validated; each part is one segment
    (a namespace "a/sa/admin" must not forge another path)."""
    for what, part in (("namespace", namespace), ("service account", service_account)):
        if not _SEGMENT.fullmatch(part) or part in (".", ".."):
            raise SpiffeError(f"{what} {part!r}: one path segment of letters, digits, '.', '-', '_'")
    return parse_spiffe_id(f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
