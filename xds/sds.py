"""SDS from the embedded management server: each node's workload certificate from the built-in CA.

Like istio-agent's SDS server, two Secrets per node, by name:
  `default`  tls_certificate: the node's workload certificate chain and key (ECDSA P-256, SPIFFE URI SAN)
  `ROOTCA`   validation_context: the CA's root certificate (trusted_ca)

    issuer = SecretIssuer(read_ca(Path("ca/")), ttl_s=3600)
    server = ManagementServer("resources/", secrets=issuer)   # SDS requests for those names are answered here

The identity is `spiffe://<trust domain>/ns/<NAMESPACE>/sa/<SERVICE_ACCOUNT>` from the node's metadata (the
keys istio-agent sends), else namespace `default` and service account = node id. The server believes the
node's claim: serve SDS only on a channel that authenticates nodes (unix socket, mTLS; docs/security.md).
A certificate is re-issued once half its lifetime has passed (istio-agent rotates at half-life too); the
rotation task wakes every stream, which then gets the new Secret (SotW: a new version, Delta: the changed
resource). Keys exist only in this process's memory and on the ADS stream.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from google.protobuf import any_pb2, struct_pb2

from planemesh.agent.identity.ca import DEFAULT_WORKLOAD_TTL_S, CertError, CertificateAuthority, Issued, utcnow
from planemesh.agent.identity.ca_files import parse_duration, read_ca
from planemesh.agent.identity.ca_service import ANY_IDENTITY, CsrSigner, read_token_file
from planemesh.agent.identity.spiffe import SpiffeError, SpiffeId, istio_identity
from planemesh.model.config import ConfigError
from planemesh.model.defaults import option
from planemesh.xds.resources import pack
from planemesh.xds.sds_secrets import ROOT_SECRET as ROOT_SECRET
from planemesh.xds.sds_secrets import WORKLOAD_SECRET as WORKLOAD_SECRET
from planemesh.xds.sds_secrets import root_secret as root_secret
from planemesh.xds.sds_secrets import tls_certificate_secret as tls_certificate_secret

log = logging.getLogger("planemesh.xds.sds")
MIN_ROTATION_WAIT_S = 0.05  # the rotation task never spins, whatever the clock says


def node_identity(node: base_pb2.Node, trust_domain: str) -> SpiffeId:
    """The SPIFFE ID a node asks for: Istio's NAMESPACE / SERVICE_ACCOUNT metadata, else default / node id."""
    fields = node.metadata.fields

    def text(key: str) -> str | None:
        value = fields.get(key)
        return value.string_value if value is not None and value.HasField("string_value") else None

    namespace = text("NAMESPACE") or "default"
    account = text("SERVICE_ACCOUNT") or re.sub(r"[^A-Za-z0-9._-]", "-", node.id or "unknown")
    return istio_identity(trust_domain, namespace, account)


def _digest(packed: any_pb2.Any) -> str:
    return hashlib.sha256(packed.SerializeToString(deterministic=True)).hexdigest()[:16]


@dataclass(slots=True)
class _NodeSecrets:
    identity: SpiffeId
    issued: Issued
    rotate_at: dt.datetime
    generation: int
    packed: dict[str, any_pb2.Any]
    digests: dict[str, str]


class SecretIssuer:
    """Issues and rotates each node's `default` and `ROOTCA` Secrets (no I/O; `rotate_forever` is the timer)."""

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        ttl_s: float = DEFAULT_WORKLOAD_TTL_S,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.ca = ca
        self.ttl_s = ttl_s
        self.clock = clock
        self._nodes: dict[SpiffeId, _NodeSecrets] = {}
        self.issued = 0  # certificates issued (first ones and rotations)
        self.refused = 0  # nodes whose metadata names no valid identity
        self.failed = 0  # issuing failed (an expired CA)

    def served(
        self, node: base_pb2.Node, static: Mapping[str, any_pb2.Any], static_version: int
    ) -> tuple[dict[str, any_pb2.Any], dict[str, str], str]:
        """(resources by name, Delta digests by name, SotW version) for one node's SDS: the node's issued
        Secrets over the statically served ones (files / set_resources) of the same name."""
        items = dict(static)
        digests = {n: _digest(a) for n, a in static.items()}
        try:
            identity = node_identity(node, self.ca.trust_domain)
        except SpiffeError as exc:
            self.refused += 1
            log.warning("node %r: no SDS identity: %s", node.id, exc)
            return items, digests, f"{static_version}.0"
        try:
            entry = self._current(identity)
        except CertError as exc:  # the CA expired (or cannot sign): no Secret, the stream stays up
            self.failed += 1
            log.error("cannot issue %s: %s", identity, exc)
            return items, digests, f"{static_version}.0"
        items.update(entry.packed)
        digests.update(entry.digests)
        return items, digests, f"{static_version}.{entry.generation}"

    def _current(self, identity: SpiffeId) -> _NodeSecrets:
        now = self.clock()
        entry = self._nodes.get(identity)
        if entry is not None and now < entry.rotate_at:
            return entry
        issued = self.ca.issue(identity, now=now, ttl_s=self.ttl_s)
        self.issued += 1
        lifetime = issued.not_after - now
        packed = {
            WORKLOAD_SECRET: pack(tls_certificate_secret(issued)),
            ROOT_SECRET: pack(root_secret(self.ca.root_pem())),
        }
        entry = _NodeSecrets(
            identity,
            issued,
            rotate_at=now + lifetime / 2,
            generation=(entry.generation + 1) if entry is not None else 1,
            packed=packed,
            digests={n: _digest(a) for n, a in packed.items()},
        )
        self._nodes[identity] = entry
        log.info("issued %s until %s (rotation at %s)", identity, issued.not_after.isoformat(), entry.rotate_at)
        return entry

    def next_rotation(self) -> dt.datetime | None:
        return min((e.rotate_at for e in self._nodes.values()), default=None)

    def rotate_due(self) -> int:
        """Re-issue every certificate past its half-life; how many were."""
        now = self.clock()
        due = [identity for identity, e in self._nodes.items() if now >= e.rotate_at]
        done = 0
        for identity in due:
            try:
                self._current(identity)
                done += 1
            except CertError as exc:
                self.failed += 1
                del self._nodes[identity]  # asked again on its next request (and refused again, logged)
                log.error("cannot rotate %s: %s", identity, exc)
        return done

    async def rotate_forever(self, wake: Callable[[], None]) -> None:
        """Sleep until the next half-life, re-issue what is due, then wake every stream to push it."""
        while True:
            due = self.next_rotation()
            wait = 1.0 if due is None else (due - self.clock()).total_seconds()
            await asyncio.sleep(max(wait, MIN_ROTATION_WAIT_S))
            if self.rotate_due():
                wake()


def add_sds_arguments(parser: argparse.ArgumentParser) -> None:
    # defaults, variables and help: planemesh.model.defaults (docs/configuration.md)
    parser.add_argument("--ca", **option("xds-server", "--ca"))
    parser.add_argument("--sds-cert-ttl", type=parse_duration, **option("xds-server", "--sds-cert-ttl"))
    parser.add_argument("--ca-api", choices=("both", "csr", "sds"), **option("xds-server", "--ca-api"))
    parser.add_argument("--ca-tokens", **option("xds-server", "--ca-tokens"))


def issuer_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SecretIssuer | None:
    if not args.ca:
        return None
    try:
        return SecretIssuer(read_ca(Path(args.ca)), ttl_s=args.sds_cert_ttl)
    except ConfigError as exc:
        parser.error(str(exc))


def signer_from_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, issuer: SecretIssuer | None, bearer_token: str | None
) -> CsrSigner | None:
    """CreateCertificate next to SDS when --ca is given and callers can be authenticated (a token)."""
    if issuer is None:
        if args.ca_tokens:
            parser.error("--ca-tokens needs --ca")
        return None
    try:
        if args.ca_tokens:
            tokens = read_token_file(Path(args.ca_tokens), issuer.ca.trust_domain)
        elif bearer_token is not None:
            tokens = {bearer_token: ANY_IDENTITY}
        else:
            log.warning("CreateCertificate not served: no --ca-tokens and no --bearer-token-file to check callers")
            return None
    except ConfigError as exc:
        parser.error(str(exc))
    return CsrSigner(issuer.ca, tokens, ttl_s=issuer.ttl_s)


def node_metadata(namespace: str, service_account: str) -> struct_pb2.Struct:
    """Node metadata asking for an identity, as istio-agent sends it (tests, bootstrap files)."""
    meta = struct_pb2.Struct()
    meta.update({"NAMESPACE": namespace, "SERVICE_ACCOUNT": service_account})
    return meta
