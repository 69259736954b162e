"""The workload side of istio's CSR flow, without I/O: a key and CSR in memory, the signed chain checked.

    key, csr_pem = new_csr(spiffe_id)                      # ECDSA P-256, the key never leaves memory
    cert = accept_chain(response_chain, roots, key, spiffe_id, now)   # -> WorkloadCert, or CertError
    cert.rotate_at                                         # half-life, as istio-agent rotates

The CA's answer is not trusted blindly: the leaf must carry our public key and the SPIFFE ID we asked for,
and the chain must verify to the roots it came with (a CA that answers with someone else's certificate,
an expired one or a broken chain is refused, and the previous certificate stays in use).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from planemesh.agent.identity.ca import CertError, key_pem, load_certs, new_key, verify_workload
from planemesh.agent.identity.spiffe import SpiffeId


def new_csr(spiffe_id: SpiffeId) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and a CSR for `spiffe_id` (empty subject, one URI SAN: istio-agent's shape)."""
    key = new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class WorkloadCert:
    """A certificate the CA signed for our key: what SDS `default` (chain + key) and `ROOTCA` carry."""

    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    key: ec.EllipticCurvePrivateKey
    spiffe_id: SpiffeId

    def cert_chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.leaf, *self.intermediates))

    def key_pem(self) -> bytes:
        return key_pem(self.key)

    def roots_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots)

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def rotate_at(self) -> dt.datetime:
        """Half-life (istio-agent's SECRET_GRACE_PERIOD_RATIO 0.5)."""
        start = self.leaf.not_valid_before_utc
        return start + (self.not_after - start) / 2

    def __repr__(self) -> str:  # never the key
        return f"WorkloadCert({self.spiffe_id}, not_after={self.not_after.isoformat()})"


def split_chain(cert_chain: list[str], root_certs: list[str]) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """istio's two response shapes -> (leaf + intermediates, roots). Without `root_cert` the last PEM entry
    holds the root(s); every entry may itself hold several PEM blocks."""
    if not cert_chain:
        raise CertError("CreateCertificate response: cert_chain is empty")
    blocks = [load_certs(pem.encode(), f"cert_chain[{i}]") for i, pem in enumerate(cert_chain)]
    if root_certs:
        roots = [c for i, pem in enumerate(root_certs) for c in load_certs(pem.encode(), f"root_cert.ca_cert[{i}]")]
        return [c for block in blocks for c in block], roots
    if len(blocks) < 2:
        raise CertError("CreateCertificate response: cert_chain has no root (one entry, no root_cert)")
    return [c for block in blocks[:-1] for c in block], blocks[-1]


def accept_chain(
    cert_chain: list[str],
    root_certs: list[str],
    key: ec.EllipticCurvePrivateKey,
    spiffe_id: SpiffeId,
    now: dt.datetime,
) -> WorkloadCert:
    """Check what the CA returned for our CSR; CertError saying what is wrong."""
    chain, roots = split_chain(cert_chain, root_certs)
    leaf, intermediates = chain[0], tuple(chain[1:])
    if leaf.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise CertError("CreateCertificate response: the leaf certificate is not for our key")
    got = verify_workload(leaf, intermediates, roots, now)
    if got != spiffe_id:
        raise CertError(f"CreateCertificate response: the certificate names {got}, we asked for {spiffe_id}")
    return WorkloadCert(leaf, intermediates, tuple(roots), key, spiffe_id)


__all__ = ["WorkloadCert", "accept_chain", "new_csr", "split_chain"]
