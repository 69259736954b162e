"""TLS in the configuration model (no I/O): secrets by name and the TLS contexts that reference them.

A Listener's `tls` (DownstreamTlsContext) and a Cluster's `tls` (UpstreamTlsContext) name their certificate
and trust secrets; the material lives once in `Snapshot.secrets`, so a rotated secret is a new snapshot whose
listeners and clusters did not change (new handshakes use the new material: agent/proxy/tls.py).
Inline secrets of a context get a synthetic name (`inline:<resource path>`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

TLS_VERSIONS = ("TLSv1_0", "TLSv1_1", "TLSv1_2", "TLSv1_3")  # Envoy's TlsParameters.TlsProtocol names


@dataclass(frozen=True, slots=True)
class CertSecret:
    """tls_certificate: a PEM chain (leaf first) and its PEM private key."""

    chain_pem: bytes
    # Never printed (repr) nor dumped (model/snapshot_json.py writes "[redacted]", as Envoy's config_dump does).
    key_pem: bytes = field(repr=False, metadata={"redact": True})


@dataclass(frozen=True, slots=True)
class TrustSecret:
    """validation_context: PEM roots, and the subject alt names a peer must present (any one of them)."""

    ca_pem: bytes
    san: tuple[SanMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class SanMatch:
    """One match_typed_subject_alt_names entry: kind URI/DNS, and a StringMatcher (exact/prefix/suffix/contains)."""

    kind: str  # "uri" | "dns" | "any" (the deprecated match_subject_alt_names: every SAN type; Istio uses it)
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    contains: str | None = None

    def matches(self, value: str) -> bool:
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        if self.suffix is not None:
            return value.endswith(self.suffix)
        return self.contains is not None and self.contains in value


@dataclass(frozen=True, slots=True)
class TlsContext:
    """Downstream (listener, server side) or upstream (cluster, client side) TLS settings."""

    cert: str | None = None  # a CertSecret's name; required downstream
    trust: str | None = None  # a TrustSecret's name; None: the peer's certificate is not verified
    san: tuple[SanMatch, ...] = ()  # the context's own matchers (combined_validation_context default + SDS one)
    alpn: tuple[str, ...] = ()
    min_version: str = "TLSv1_2"  # Envoy's defaults: TLS 1.2 .. 1.3 (servers and clients)
    max_version: str = "TLSv1_3"
    ciphers: tuple[str, ...] = ()  # OpenSSL cipher names for TLS <= 1.2; empty: the library's default
    require_client_cert: bool = False  # downstream only
    sni: str = ""  # upstream only
    inline: tuple[tuple[str, CertSecret | TrustSecret], ...] = ()  # secrets given inline: (name, material)
    # downstream only: TLS session tickets (Envoy: disable_stateless_session_resumption false). OpenSSL 3.0 spends
    # about a third of a server handshake issuing them (docs/benchmarks.md, TLS section); clients that never
    # resume (pooled mesh connections) gain nothing from them.
    session_tickets: bool = True


@dataclass(frozen=True, slots=True)
class TlsMatch:
    """One transport_socket_matches entry: endpoints whose `envoy.transport_socket_match` metadata holds all of
    `labels` use `tls` (None: plaintext, raw_buffer). Istio: {tlsMode: istio} -> mTLS."""

    name: str
    labels: tuple[tuple[str, str], ...]
    tls: TlsContext | None


Secret = CertSecret | TrustSecret


def endpoint_tls(cluster: object, endpoint: object, addr: tuple[str, int]) -> TlsContext | None:
    """The TLS context of an upstream connection: the endpoint's transport_socket match, else the cluster's.
    Without the picked endpoint (a retry's fallback address), the endpoint is found by address: never plaintext
    to an endpoint whose match says TLS."""
    if endpoint is None and cluster.tls_matches:  # type: ignore[attr-defined]
        endpoint = next((e for e in cluster.endpoints if (e.address, e.port) == addr), None)  # type: ignore[attr-defined]
    index = getattr(endpoint, "tls_socket", -1)
    if index >= 0:
        return cluster.tls_matches[index].tls  # type: ignore[attr-defined]
    return cluster.tls  # type: ignore[attr-defined]


def any_tls(cluster: object) -> bool:
    return cluster.tls is not None or any(m.tls is not None for m in cluster.tls_matches)  # type: ignore[attr-defined]


def san_accepts(matchers: tuple[SanMatch, ...], uris: list[str], dns: list[str]) -> bool:
    """Envoy: with matchers, the peer passes if any of its SANs of the matcher's kind matches any matcher."""
    if not matchers:
        return True

    def values(kind: str) -> list[str]:
        return uris if kind == "uri" else dns if kind == "dns" else uris + dns  # "any": match_subject_alt_names

    return any(m.matches(v) for m in matchers for v in values(m.kind))


PLANE_MTLS_MODES = ("", "strict", "permissive", "disable")
PLANE_ALPN = ("h2", "http/1.1")


def plane_mtls_error(sla: object) -> tuple[str, str] | None:
    """(field, why) when a plane SLA's mTLS settings are not usable (model/planes.py SLA.mtls*)."""
    mode = getattr(sla, "mtls", "")
    if mode not in PLANE_MTLS_MODES:
        return "mtls", f"{mode!r}: expected strict, permissive, disable or empty (as the listeners say)"
    for key in ("mtls_cert", "mtls_trust"):
        if not getattr(sla, key):
            return key, "an SDS Secret name is required"
    domain = getattr(sla, "mtls_trust_domain", None)
    if domain is not None and (not domain or "/" in domain or ":" in domain or domain != domain.lower()):
        return "mtls_trust_domain", f"{domain!r} is not a trust domain (lower case, no scheme or path)"
    return None


def plane_tls(sla: object) -> TlsContext | None:
    """The TLS context a plane's SLA imposes on its proxied ports (strict / permissive), else None."""
    if getattr(sla, "mtls", "") not in ("strict", "permissive"):
        return None
    domain = getattr(sla, "mtls_trust_domain", None)
    san = (SanMatch("uri", prefix=f"spiffe://{domain}/"),) if domain else ()
    return TlsContext(
        cert=sla.mtls_cert,  # type: ignore[attr-defined]
        trust=sla.mtls_trust,  # type: ignore[attr-defined]
        san=san,
        alpn=PLANE_ALPN,
        require_client_cert=True,
    )


def plane_secret_names(planes: Iterable[object]) -> set[str]:
    """The Secrets the planes' SLA mTLS (strict / permissive) terminates with: the xDS client subscribes to them
    even when no listener or cluster names them (xds/client_state.py pinned_secrets)."""
    contexts = [ctx for plane in planes if (ctx := plane_tls(getattr(plane, "sla", None))) is not None]
    return {name for ctx in contexts for name in (ctx.cert, ctx.trust) if name}
