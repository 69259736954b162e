"""The plane SLA's mTLS settings: parsed from the static configuration, validated by name, and a plane that
requires mTLS makes its certificate and roots part of the xDS update (an update without them is refused
rather than served in plaintext)."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest
import yaml

from planemesh.agent.identity.ca import new_root, utcnow
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.model.config import ConfigError
from planemesh.model.static_config import default_config_text, snapshot_from_dict
from planemesh.model.tls_config import CertSecret, TrustSecret, plane_tls
from planemesh.xds.per_resource import translate_update
from planemesh.xds.sds import root_secret, tls_certificate_secret
from planemesh.xds.translate import translate
from tests.unit.test_xds_translate import PASS, to_resources

pytestmark = pytest.mark.unit


def planes_with(**sla) -> tuple:
    raw = yaml.safe_load(default_config_text())
    raw["planes"][0]["sla"] = {**(raw["planes"][0].get("sla") or {}), **sla}
    return snapshot_from_dict({"planes": raw["planes"]}, version="t").planes


def test_static_sla_parses_and_builds_the_plane_context() -> None:
    planes = planes_with(mtls="strict", mtls_cert="oam-cert", mtls_trust="oam-roots", mtls_trust_domain="oam.op")
    ctx = plane_tls(planes[0].sla)
    assert ctx is not None and (ctx.cert, ctx.trust, ctx.require_client_cert) == ("oam-cert", "oam-roots", True)
    assert ctx.san[0].prefix == "spiffe://oam.op/" and ctx.alpn == ("h2", "http/1.1")
    assert plane_tls(planes[1].sla) is None  # the other plane: as its listeners say
    assert plane_tls(planes_with(mtls="disable")[0].sla) is None


@pytest.mark.parametrize(
    ("sla", "where"),
    [({"mtls": "on"}, "sla.mtls"), ({"mtls": 1}, "sla.mtls"), ({"mtls_cert": ""}, "sla.mtls_cert"),
     ({"mtls_trust_domain": "spiffe://x"}, "sla.mtls_trust_domain")],
)  # fmt: skip
def test_bad_values_are_refused_by_name(sla, where) -> None:
    with pytest.raises(ConfigError, match=where):
        planes_with(**sla)


def test_a_strict_plane_needs_its_secrets_in_the_update() -> None:
    planes = planes_with(mtls="strict")
    resources = to_resources([PASS])
    with pytest.raises(ConfigError, match=r"planes\[oam\].sla.mtls_cert.*'default' has not arrived"):
        translate(resources, planes)
    with pytest.raises(ConfigError, match=r"planes\[oam\].sla.mtls_cert"):
        translate_update(resources, planes)
    root = new_root("cluster.local", now=utcnow())
    issued = root.issue(parse_spiffe_id("spiffe://cluster.local/ns/oam/sa/node"), now=utcnow())
    served = {"default": tls_certificate_secret(issued), "ROOTCA": root_secret(root.root_pem())}
    with_secrets = replace(resources, secrets=MappingProxyType(served))
    for snap in (translate(with_secrets, planes), translate_update(with_secrets, planes).snapshot):
        assert isinstance(snap.secrets["default"], CertSecret) and isinstance(snap.secrets["ROOTCA"], TrustSecret)
