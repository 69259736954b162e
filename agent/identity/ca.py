"""The built-in CA, without I/O: roots, intermediates and SPIFFE workload certificates (ECDSA P-256).

    root = new_root("cluster.local", now=now)                          # self-signed, 10 years
    inter = root.intermediate("planemesh node-1", now=now)             # path length 0, 1 year
    issued = inter.issue(parse_spiffe_id("spiffe://cluster.local/ns/default/sa/web"), now=now)
    issued.cert_chain_pem(), issued.key_pem(), inter.root_pem()        # what SDS `default` / `ROOTCA` carry
    verify_workload(issued.cert, issued.chain, [root.cert], now)       # -> the SpiffeId, or CertError

Workload certificates look like Istio's: empty subject, one critical URI SAN (the SPIFFE ID), EKU
serverAuth + clientAuth, not a CA, short-lived (DEFAULT_WORKLOAD_TTL_S, Istio's default 24 h). Files are
read and written by agent/identity/ca_files.py only; keys here live in memory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from planemesh.agent.identity.cert_types import DEFAULT_WORKLOAD_TTL_S as DEFAULT_WORKLOAD_TTL_S
from planemesh.agent.identity.cert_types import MAX_WORKLOAD_TTL_S as MAX_WORKLOAD_TTL_S
from planemesh.agent.identity.cert_types import CertError as CertError
from planemesh.agent.identity.cert_types import utcnow as utcnow
from planemesh.agent.identity.spiffe import SpiffeError, SpiffeId, parse_spiffe_id

DEFAULT_ROOT_TTL_S = 10 * 365 * 86400  # istio's self-signed root: 10 years
DEFAULT_INTERMEDIATE_TTL_S = 365 * 86400
BACKDATE_S = 60  # notBefore is a minute early: peers with a slightly slow clock still accept a fresh cert


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _validity(builder: x509.CertificateBuilder, now: dt.datetime, ttl_s: float) -> x509.CertificateBuilder:
    if ttl_s <= 0:
        raise CertError(f"ttl {ttl_s}s: must be positive")
    return builder.not_valid_before(now - dt.timedelta(seconds=BACKDATE_S)).not_valid_after(
        now + dt.timedelta(seconds=ttl_s)
    )


def _ca_extensions(builder: x509.CertificateBuilder, path_length: int | None) -> x509.CertificateBuilder:
    return builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True).add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _serial() -> int:
    return x509.random_serial_number()


@dataclass(frozen=True, slots=True)
class Issued:
    """A workload certificate: the leaf, the chain up to (not including) the root, the key if we made it."""

    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: ec.EllipticCurvePrivateKey | None
    spiffe_id: SpiffeId

    def cert_chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.chain))

    def key_pem(self) -> bytes:
        if self.key is None:
            raise CertError("the key of a certificate issued for a CSR stays with the requester")
        return key_pem(self.key)

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        return self.cert.not_valid_before_utc


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A signing CA: its certificate and key, the chain above it (intermediates, then the root)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    parents: tuple[x509.Certificate, ...] = field(default=())
    trust_domain: str = "cluster.local"

    @property
    def root(self) -> x509.Certificate:
        return self.parents[-1] if self.parents else self.cert

    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def chain_pem(self) -> bytes:
        """This CA's certificate and its parents (Istio's cert-chain.pem of a plugged-in CA)."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.cert, *self.parents))

    def intermediate(
        self, common_name: str, *, now: dt.datetime, ttl_s: float = DEFAULT_INTERMEDIATE_TTL_S, path_length: int = 0
    ) -> CertificateAuthority:
        key = new_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, self.trust_domain))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        builder = _ca_extensions(_validity(builder, now, min(ttl_s, self._remaining_s(now))), path_length)
        cert = builder.sign(self.key, hashes.SHA256())
        return CertificateAuthority(cert, key, (self.cert, *self.parents), self.trust_domain)

    def issue(
        self,
        spiffe_id: SpiffeId,
        *,
        now: dt.datetime,
        ttl_s: float = DEFAULT_WORKLOAD_TTL_S,
        public_key: ec.EllipticCurvePublicKey | None = None,
    ) -> Issued:
        """A workload certificate for `spiffe_id` (its own fresh key unless `public_key` comes from a CSR)."""
        if spiffe_id.trust_domain != self.trust_domain:
            raise CertError(f"{spiffe_id}: trust domain is not this CA's {self.trust_domain!r}")
        if ttl_s > MAX_WORKLOAD_TTL_S:
            raise CertError(f"ttl {ttl_s}s: above the workload maximum of {MAX_WORKLOAD_TTL_S}s")
        key = new_key() if public_key is None else None
        pub = key.public_key() if key is not None else public_key
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
            raise CertError("workload keys are ECDSA P-256")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(pub)
            .serial_number(_serial())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            # An empty subject makes the SAN critical (RFC 5280 4.2.1.6), as in Istio's workload certificates.
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]), critical=True)
        )
        cert = _validity(builder, now, min(ttl_s, self._remaining_s(now))).sign(self.key, hashes.SHA256())
        return Issued(cert, (self.cert, *self.parents) if self.parents else (), key, spiffe_id)

    def issue_for_csr(self, csr_pem: bytes, *, now: dt.datetime, ttl_s: float = DEFAULT_WORKLOAD_TTL_S) -> Issued:
        """Sign a CSR (istio-agent's path): the identity is its one SPIFFE URI SAN, its signature must verify."""
        spiffe_id, public_key = csr_identity(csr_pem)
        return self.issue(spiffe_id, now=now, ttl_s=ttl_s, public_key=public_key)

    def _remaining_s(self, now: dt.datetime) -> float:
        """Nothing this CA signs outlives it."""
        left = (self.cert.not_valid_after_utc - now).total_seconds()
        if left <= 0:
            raise CertError(f"CA certificate {self.cert.subject.rfc4514_string()} expired")
        return left


def csr_identity(csr_pem: bytes) -> tuple[SpiffeId, ec.EllipticCurvePublicKey]:
    """The SPIFFE ID a CSR asks for and its public key; CertError unless it parses, its signature verifies
    and it has exactly one URI SAN that is a SPIFFE ID."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CertError(f"CSR: not a PEM certificate request ({exc})") from None
    if not csr.is_signature_valid:
        raise CertError("CSR: signature does not verify")
    uris = _uri_sans(csr.extensions)
    if len(uris) != 1:
        raise CertError(f"CSR: expected exactly one URI SAN, found {len(uris)}")
    try:
        spiffe_id = parse_spiffe_id(uris[0])
    except SpiffeError as exc:
        raise CertError(f"CSR: {exc}") from None
    return spiffe_id, csr.public_key()  # type: ignore[return-value]  # issue() checks the key type


def new_root(
    trust_domain: str, *, now: dt.datetime, common_name: str = "planemesh root CA", ttl_s: float = DEFAULT_ROOT_TTL_S
) -> CertificateAuthority:
    parse_spiffe_id(f"spiffe://{trust_domain}")  # the trust domain must be a valid one
    key = new_key()
    name = _name(common_name, trust_domain)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = _ca_extensions(_validity(builder, now, ttl_s), None).sign(key, hashes.SHA256())
    return CertificateAuthority(cert, key, (), trust_domain)


# ---- PEM in and out (bytes only) ---------------------------------------------------------------------------


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle; CertError naming `what` when there is none or one is broken."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CertError(f"{what}: not a PEM certificate bundle ({exc})") from None
    if not certs:
        raise CertError(f"{what}: no certificate")
    return certs


def load_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{what}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{what}: planemesh's CA signs with ECDSA keys only")
    return key


def load_ca(cert_pem: bytes, key_pem_bytes: bytes, chain_pem: bytes = b"") -> CertificateAuthority:
    """A CA from PEM: its certificate (first of cert_pem), key, and parents (chain_pem or the rest of cert_pem)."""
    certs = load_certs(cert_pem, "CA certificate")
    key = load_key(key_pem_bytes, "CA key")
    cert = certs[0]
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise CertError("CA key does not belong to the CA certificate")
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if not constraints.ca:
        raise CertError("CA certificate is not a CA (basicConstraints CA:FALSE)")
    parents = [c for c in (load_certs(chain_pem, "CA chain") if chain_pem else certs[1:]) if c != cert]
    domain = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return CertificateAuthority(cert, key, tuple(parents), str(domain[0].value) if domain else "cluster.local")


# ---- verification ------------------------------------------------------------------------------------------


def _uri_sans(extensions: x509.Extensions) -> list[str]:
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    """The certificate's spiffe:// URI SANs (what Envoy's match_typed_subject_alt_names URI compares)."""
    return [u for u in _uri_sans(cert.extensions) if u.startswith("spiffe://")]


def verify_workload(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
) -> SpiffeId:
    """Path-validate a workload certificate (RFC 5280, via cryptography's verifier) and return its SPIFFE ID."""
    if not roots:
        raise CertError("no trusted root")
    verifier = PolicyBuilder().store(Store(list(roots))).time(now).build_client_verifier()
    try:
        verifier.verify(leaf, list(intermediates))
    except VerificationError as exc:
        raise CertError(f"certificate does not verify: {exc}") from None
    ids = spiffe_ids(leaf)
    if len(ids) != 1:
        raise CertError(f"expected one SPIFFE URI SAN, found {len(ids)}")
    try:
        return parse_spiffe_id(ids[0])
    except SpiffeError as exc:
        raise CertError(str(exc)) from None
