"""SDS issuing without I/O: identity from node metadata, `default`/`ROOTCA` Secrets that verify, rotation at
half-life (a controllable clock), static secrets of other names kept, a node claiming a bad identity refused."""

from __future__ import annotations

import datetime as dt

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from planemesh.agent.identity.ca import load_certs, new_root, spiffe_ids, verify_workload
from planemesh.xds.resources import pack
from planemesh.xds.sds import ROOT_SECRET, WORKLOAD_SECRET, SecretIssuer, node_metadata, root_secret

pytestmark = pytest.mark.unit
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


def unpack(packed) -> secret_pb2.Secret:
    msg = secret_pb2.Secret()
    packed.Unpack(msg)
    return msg


@pytest.fixture()
def issuer():
    root = new_root("cluster.local", now=T0 - dt.timedelta(days=1))
    return SecretIssuer(root.intermediate("node", now=T0 - dt.timedelta(days=1)), ttl_s=3600, clock=Clock())


def node(namespace: str = "ran", account: str = "amf", node_id: str = "n1") -> base_pb2.Node:
    return base_pb2.Node(id=node_id, metadata=node_metadata(namespace, account))


def test_secrets_carry_a_verifying_spiffe_certificate(issuer):
    items, digests, version = issuer.served(node(), {}, 0)
    assert set(items) == set(digests) == {WORKLOAD_SECRET, ROOT_SECRET} and version == "0.1"
    tls = unpack(items[WORKLOAD_SECRET]).tls_certificate
    chain = load_certs(tls.certificate_chain.inline_bytes, "chain")
    assert b"PRIVATE KEY" in tls.private_key.inline_bytes
    roots = load_certs(unpack(items[ROOT_SECRET]).validation_context.trusted_ca.inline_bytes, "root")
    assert str(verify_workload(chain[0], chain[1:], roots, T0)) == "spiffe://cluster.local/ns/ran/sa/amf"


def test_rotation_at_half_life(issuer):
    first, digests1, _ = issuer.served(node(), {}, 0)
    issuer.clock.now = T0 + dt.timedelta(minutes=29)
    _, digests2, version = issuer.served(node(), {}, 0)
    assert digests2 == digests1 and version == "0.1" and issuer.rotate_due() == 0
    assert issuer.next_rotation() == T0 + dt.timedelta(minutes=30)
    issuer.clock.now = T0 + dt.timedelta(minutes=30)
    assert issuer.rotate_due() == 1
    later, digests3, version = issuer.served(node(), {}, 0)
    assert version == "0.2" and digests3[WORKLOAD_SECRET] != digests1[WORKLOAD_SECRET]
    assert digests3[ROOT_SECRET] == digests1[ROOT_SECRET]  # the root did not change
    old = load_certs(unpack(first[WORKLOAD_SECRET]).tls_certificate.certificate_chain.inline_bytes, "x")[0]
    new = load_certs(unpack(later[WORKLOAD_SECRET]).tls_certificate.certificate_chain.inline_bytes, "x")[0]
    assert new.serial_number != old.serial_number and spiffe_ids(new) == spiffe_ids(old)
    assert issuer.issued == 2


def test_identity_defaults_and_refusal(issuer):
    items, _, _ = issuer.served(base_pb2.Node(id="node/1 x"), {}, 3)
    chain = unpack(items[WORKLOAD_SECRET]).tls_certificate.certificate_chain.inline_bytes
    assert spiffe_ids(load_certs(chain, "x")[0]) == ["spiffe://cluster.local/ns/default/sa/node-1-x"]
    static = {"other": pack(root_secret(b"pem", name="other"))}
    for bad in (node(namespace="ran/sa/admin"), node(account="..")):  # a forged path, a dot segment
        items, _, version = issuer.served(bad, static, 3)
        assert set(items) == {"other"} and version == "3.0"
    assert issuer.refused == 2


def test_an_expired_ca_serves_no_secret_and_raises_nothing():
    clock = Clock()
    root = new_root("cluster.local", now=T0, ttl_s=7200)
    issuer = SecretIssuer(root, ttl_s=3600, clock=clock)
    items, _, _ = issuer.served(node(), {}, 0)
    assert WORKLOAD_SECRET in items
    clock.now = T0 + dt.timedelta(hours=3)  # past the CA's own end
    assert issuer.rotate_due() == 0 and issuer.failed == 1
    items, _, version = issuer.served(node(), {}, 0)
    assert items == {} and version == "0.0" and issuer.failed == 2
