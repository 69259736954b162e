"""A plane's mTLS mode, certificate, roots and trust domain set by a control plane through listener metadata
`planemesh.sla`, like the other SLA fields (xds/translate_sla.py): checked by name, the plane's Secrets
subscribed (xds/tls_refs.py) and required, and a listener asking for Secrets that have not arrived is refused
alone while the rest serves. Before, these string fields were refused ("expected a non-negative number")."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest

from planemesh.agent.identity.ca import new_root, utcnow
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.ebpf.abi import Action
from planemesh.ebpf.policy import PolicyRule, policy_from_snapshot
from planemesh.model.config import ConfigError
from planemesh.model.tls_config import CertSecret
from planemesh.xds.client_state import LISTENER, SECRET, references
from planemesh.xds.per_resource import translate_update
from planemesh.xds.sds import root_secret, tls_certificate_secret
from planemesh.xds.translate import translate
from tests.unit.test_xds_istio_translate import listener, tcp
from tests.unit.test_xds_translate import PASS, PLANES, to_resources

pytestmark = pytest.mark.unit

ROOT = new_root("cluster.local", now=utcnow())
ISSUED = ROOT.issue(parse_spiffe_id("spiffe://cluster.local/ns/oam/sa/node"), now=utcnow())


def db(**sla) -> dict:
    meta = {"filter_metadata": {"planemesh": {"plane": "oam", "sla": sla}}}
    return listener([{"filters": [tcp()]}], name="db", port=9400, metadata=meta)


def web() -> dict:
    return listener([{"filters": [tcp()]}], name="web", port=9401)


def resources(*docs: dict, secrets: dict | None = None):
    res = to_resources([*docs, PASS])
    return replace(res, secrets=MappingProxyType(secrets or {}))


SERVED = {"oam-cert": tls_certificate_secret(ISSUED), "oam-roots": root_secret(ROOT.root_pem())}
OAM_SLA = {"mtls": "strict", "mtls_cert": "oam-cert", "mtls_trust": "oam-roots", "mtls_trust_domain": "cluster.local"}


def test_listener_metadata_makes_a_plane_strict_with_its_secrets() -> None:
    res = resources(db(**OAM_SLA), web(), secrets=SERVED)
    for snap in (translate(res, PLANES), translate_update(res, PLANES).snapshot):
        oam = snap.plane("oam").sla
        assert (oam.mtls, oam.mtls_cert, oam.mtls_trust, oam.mtls_trust_domain) == tuple(OAM_SLA.values())
        assert snap.plane("media").sla.mtls == ""
        assert isinstance(snap.secrets["oam-cert"], CertSecret)
        rules = policy_from_snapshot(snap).rules  # oam's tcp_proxy chains leave the kernel bypass, media's do not
        assert rules[PolicyRule(1, 9401)] is Action.SNIFF and rules[PolicyRule(2, 9401)] is Action.BYPASS


def test_the_listener_names_the_secrets_the_client_subscribes_to() -> None:
    res = resources(db(**OAM_SLA), web())
    assert references(LISTENER, res.listeners, SECRET) == {"oam-cert", "oam-roots"}
    assert references(LISTENER, resources(db(mtls="permissive")).listeners, SECRET) == {"default", "ROOTCA"}
    assert references(LISTENER, resources(db(mtls="disable"), web()).listeners, SECRET) == set()


def test_a_listener_asking_for_secrets_that_have_not_arrived_is_refused_alone() -> None:
    res = resources(db(**OAM_SLA), web())
    with pytest.raises(ConfigError, match=r"planes\[oam\]\.sla\.mtls_cert.*'oam-cert' has not arrived"):
        translate(res, PLANES)
    got = translate_update(res, PLANES)
    assert "db" in got.rejected[LISTENER] and "oam-cert" in got.rejected[LISTENER]["db"]
    assert got.snapshot.plane("oam").sla.mtls == ""  # no plaintext pretending to be strict: the listener is NACKed
    assert {lsn.name for lsn in got.snapshot.listeners} == {"web@oam", "web@media"}  # the rest serves


@pytest.mark.parametrize(("sla", "field", "why"), [
    ({"mtls": "on"}, "mtls", "expected strict, permissive, disable"), ({"mtls": 1}, "mtls", "expected a string"),
    ({"mtls_cert": ""}, "mtls_cert", "an SDS Secret name is required"),
    ({"mtls_trust_domain": "spiffe://x"}, "mtls_trust_domain", "is not a trust domain")])  # fmt: skip
def test_bad_mtls_metadata_is_refused_by_name(sla: dict, field: str, why: str) -> None:
    res = resources(db(**sla), secrets=SERVED)
    with pytest.raises(ConfigError, match=rf"listener\[db\]\.metadata\.planemesh\.sla\.{field}: .*{why}"):
        translate(res, PLANES)
    assert "db" in translate_update(res, PLANES).rejected[LISTENER]
