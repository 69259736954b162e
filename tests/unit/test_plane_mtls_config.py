"""The plane SLA's mTLS settings: parsed from the static configuration, validated by name, and a plane that
requires mTLS makes its certificate and roots part of the xDS update (an update without them is refused
rather than served in plaintext)."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest
import yaml

from planemesh.agent.agent_options import AgentOptions
from planemesh.agent.daemon import load_snapshot
from planemesh.agent.identity.ca import new_root, utcnow
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.agent.proxy.sniff import HTTP1, OPAQUE, Kind, Verdict
from planemesh.agent.proxy.sniff_tls import plane_refuses
from planemesh.agent.proxy.tls import TlsStats, plane_tcp_chains
from planemesh.ebpf.abi import Action
from planemesh.ebpf.policy import PolicyRule, needs_sniff_listener, policy_from_snapshot, strict_planes
from planemesh.model.config import ConfigError, Listener, ListenerProtocol, WeightedCluster
from planemesh.model.planes import SLA
from planemesh.model.static_config import default_config_text, load_static_config, snapshot_from_dict
from planemesh.model.tls_config import CertSecret, TlsContext, TrustSecret, plane_tls
from planemesh.xds.bootstrap import bootstrap_from_dict
from planemesh.xds.per_resource import translate_update
from planemesh.xds.sds import root_secret, tls_certificate_secret
from planemesh.xds.translate import translate
from planemesh.xds.transport import ads_state
from tests.unit.test_tcp_bypass_rule import CASES as BYPASS_CASES
from tests.unit.test_tcp_bypass_rule import PORT as BYPASS_PORT
from tests.unit.test_xds_istio_translate import run
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


def static_snapshot(**sla):
    raw = yaml.safe_load(default_config_text())
    raw["planes"][0]["sla"] = {**(raw["planes"][0].get("sla") or {}), **sla}
    return snapshot_from_dict(raw, version="t")


@pytest.mark.parametrize(("mode", "oam_tcp"), [("strict", Action.SNIFF), ("permissive", Action.BYPASS),
                                               ("disable", Action.BYPASS), ("", Action.BYPASS)])  # fmt: skip
def test_a_strict_planes_tcp_chains_go_to_its_proxy_not_the_kernel_bypass(mode, oam_tcp) -> None:
    """The default config's `{plane: oam, port: 9000, protocol: tcp}` (no cluster: the original destination) is
    bypassed in the kernel, unless oam requires mTLS: then its proxy terminates it. media keeps its bypass, and
    undeclared ports follow `undeclared` (bypass here: not proxied traffic)."""
    snap = static_snapshot(mtls=mode) if mode else static_snapshot()
    policy = policy_from_snapshot(snap)
    assert policy.rules[PolicyRule(1, 9000)] is oam_tcp
    assert policy.rules[PolicyRule(2, 9000)] is Action.BYPASS
    assert policy.rules[PolicyRule(1, 80)] is Action.PROXY
    assert [p.undeclared for p in policy.planes] == [Action.BYPASS, Action.BYPASS]
    assert needs_sniff_listener(snap, snap.planes[0]) is (mode == "strict")
    assert not needs_sniff_listener(snap, snap.planes[1])
    assert strict_planes(snap) == ({"oam"} if mode == "strict" else set())


PLANE_SLA = SLA(mtls="strict", mtls_cert="c", mtls_trust="r", mtls_trust_domain="ran.op")
TCP = ListenerProtocol.TCP
PLAIN = Listener("db", "oam", 9000, TCP, tcp_clusters=(WeightedCluster("db", 1),))
XDS_TLS = TlsContext(cert="default", trust="ROOTCA", require_client_cert=True)


def test_strict_turns_every_plaintext_tcp_chain_into_the_planes_mtls() -> None:
    own_tls = replace(PLAIN, name="own-tls", transport_protocol="tls", server_names=("api.example.com",))
    mtls = replace(PLAIN, name="db-mtls", tls=XDS_TLS, transport_protocol="tls")
    http = Listener("web", "oam", 80, ListenerProtocol.HTTP)
    out = plane_tcp_chains((http, PLAIN, own_tls, mtls), PLANE_SLA)
    assert [lsn.name for lsn in out] == ["web", "db-mtls", "db~mtls", "own-tls~mtls"]  # xDS's TLS chains first
    forced = plane_tls(PLANE_SLA)
    assert out[0] is http and out[1] is mtls
    assert all(lsn.tls == forced and lsn.transport_protocol == "tls" for lsn in out[2:])
    assert out[3].server_names == ("api.example.com",)  # still selected by SNI, then terminated


def test_permissive_adds_an_mtls_twin_and_keeps_plaintext() -> None:
    own_tls = replace(PLAIN, name="own-tls", transport_protocol="tls")
    out = plane_tcp_chains((PLAIN, own_tls), replace(PLANE_SLA, mtls="permissive"))
    assert [(lsn.name, lsn.transport_protocol, lsn.tls is not None) for lsn in out] == [
        ("db", "raw_buffer", False), ("own-tls", "tls", False), ("db~mtls", "tls", True)]  # fmt: skip


def test_disable_terminates_no_tcp_chain_and_no_mode_changes_nothing() -> None:
    mtls = replace(PLAIN, name="db-mtls", tls=XDS_TLS, transport_protocol="tls")
    assert plane_tcp_chains((PLAIN, mtls), SLA(mtls="disable")) == (PLAIN, replace(mtls, tls=None))
    assert plane_tcp_chains((PLAIN, mtls), SLA()) == (PLAIN, mtls)
    assert plane_tcp_chains((PLAIN, mtls), None) == (PLAIN, mtls)


@pytest.mark.parametrize(("mode", "verdict", "refused", "accepted"), [
    ("strict", HTTP1, True, 0), ("strict", OPAQUE, True, 0), ("strict", Verdict(Kind.TLS), False, 0),
    ("permissive", HTTP1, False, 1), ("permissive", Verdict(Kind.TLS), False, 0), ("", HTTP1, False, 0),
    ("disable", OPAQUE, False, 0)])  # fmt: skip
def test_the_sniffing_listener_refuses_plaintext_on_a_strict_plane(mode, verdict, refused, accepted) -> None:
    stats = TlsStats()
    assert plane_refuses(stats, mode, verdict, "198.18.1.2", 9000) is refused
    assert (stats.plaintext_refused, stats.plaintext_accepted) == (int(refused), accepted)


@pytest.mark.parametrize("case", ["own service", "passthrough cluster", "endpoints hold the destination"])
def test_istiods_bypassed_chains_are_the_proxys_on_a_strict_plane(case: str) -> None:
    """istiod's own-service VIP chains (kube-dns:53, kubernetes:443...), ORIGINAL_DST and endpoint-held chains
    are bypassed in the kernel, except on a plane whose SLA says strict."""
    docs, dst, action = BYPASS_CASES[case]
    snap, _notes = run(docs)
    prefix = dst if "/" in dst else f"{dst}/32"
    assert action is Action.BYPASS and policy_from_snapshot(snap).rules[PolicyRule(1, BYPASS_PORT, prefix)] is action
    first, *rest = snap.planes
    strict = replace(snap, planes=(replace(first, sla=replace(first.sla, mtls="strict")), *rest))
    assert policy_from_snapshot(strict).rules[PolicyRule(1, BYPASS_PORT, prefix)] is Action.SNIFF


def test_the_xds_client_subscribes_to_the_planes_secrets_unless_the_csr_flow_makes_them() -> None:
    raw = yaml.safe_load(default_config_text())
    raw["planes"][0]["sla"] = {"mtls": "strict", "mtls_cert": "oam-cert", "mtls_trust": "oam-roots"}
    raw["planes"][1]["sla"] = {"mtls": "permissive"}
    boot = {"node": {"id": "n", "metadata": {"NAMESPACE": "lab", "SERVICE_ACCOUNT": "agent"}},
            "server": {"address": "unix:///nonexistent"}, "planes": raw["planes"]}  # fmt: skip
    assert ads_state(bootstrap_from_dict(boot)).pinned_secrets == {"oam-cert", "oam-roots", "default", "ROOTCA"}
    csr = ads_state(bootstrap_from_dict({**boot, "ca": {"ttl_s": 3600}}))
    assert csr.pinned_secrets == {"oam-cert", "oam-roots"}  # `default`/`ROOTCA` are the agent's own there


@pytest.mark.parametrize("mode", ["strict", "permissive"])
def test_a_static_config_cannot_give_a_plane_requiring_mtls_its_secrets(tmp_path, mode: str) -> None:
    """Without xDS nothing brings the plane's Secrets: the agent refuses the file by name at load (before, every
    connection of the plane was refused silently). Its planes alone stay valid for a bootstrap's SDS."""
    raw = yaml.safe_load(default_config_text())
    raw["planes"][1]["sla"] = {"mtls": mode, "mtls_cert": "media-cert"}
    path = tmp_path / "static.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"^planes\[1\]\.sla\.mtls_cert: plane 'media' requires mTLS .*no Secret "
                                          r"'media-cert' \(serve it over xDS/SDS"):  # fmt: skip
        load_snapshot(AgentOptions(config=path))
    assert load_static_config(path).planes[1].sla.mtls == mode  # the planes of --xds-resources / a bootstrap
    raw["planes"][1]["sla"] = {"mtls": "disable"}
    path.write_text(yaml.safe_dump(raw))
    assert load_snapshot(AgentOptions(config=path)) is not None
    assert load_snapshot(AgentOptions()) is not None  # the embedded default
