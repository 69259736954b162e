"""The two Secrets istio-agent's SDS serves, as Envoy resources: `default` (the workload certificate chain and
key) and `ROOTCA` (the trust bundle). Built from PEM bytes only, so the xDS client (xds/transport.py) carries
them without importing the CA (xds/sds.py, `cryptography`)."""

from __future__ import annotations

from typing import Protocol

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

WORKLOAD_SECRET = "default"  # istio-agent's names (pilot/pkg/model: SDSDefaultResourceName, SDSRootResourceName)
ROOT_SECRET = "ROOTCA"


class CertAndKey(Protocol):  # agent/identity/ca.Issued, agent/identity/csr.WorkloadCert
    def cert_chain_pem(self) -> bytes: ...

    def key_pem(self) -> bytes: ...


def tls_certificate_secret(issued: CertAndKey, name: str = WORKLOAD_SECRET) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=issued.cert_chain_pem()),
            private_key=base_pb2.DataSource(inline_bytes=issued.key_pem()),
        ),
    )


def root_secret(root_pem: bytes, name: str = ROOT_SECRET) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=root_pem)
        ),
    )
