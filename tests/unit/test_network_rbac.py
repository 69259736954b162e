"""envoy.filters.network.rbac on tcp_proxy chains: translation from a Listener (what Istio's
AuthorizationPolicy compiles to for TCP), refusal of what a TCP connection cannot be checked against, and
the data path that takes such chains to the proxy instead of the kernel bypass."""

from __future__ import annotations

import pytest

from planemesh.agent.rbac import RbacFilter, RequestFacts, evaluate
from planemesh.ebpf.abi import Action
from planemesh.ebpf.policy import PolicyRule, needs_sniff_listener, policy_from_snapshot
from planemesh.model.config import ConfigError
from planemesh.xds.translate import translate
from tests.unit.test_xds_translate import PASS, PLANES, T, http_listener, to_resources

pytestmark = pytest.mark.unit
NET_RBAC = T + "envoy.extensions.filters.network.rbac.v3.RBAC"
AMF = "spiffe://cluster.local/ns/ran/sa/amf"
ISTIO_TCP = {  # AuthorizationPolicy ALLOW from sa amf or 198.18.2.0/24 to port 5432 (TCP rules only)
    "stat_prefix": "tcp.",
    "rules": {"action": "ALLOW", "policies": {"ns[media]-policy[db]-rule[0]": {
        "permissions": [{"and_rules": {"rules": [{"or_rules": {"rules": [{"destination_port": 5432}]}}]}}],
        "principals": [{"or_ids": {"ids": [
            {"authenticated": {"principal_name": {"exact": AMF}}},
            {"direct_remote_ip": {"address_prefix": "198.18.2.0", "prefix_len": 24}}]}}]}}},
}  # fmt: skip


def tcp_with_rbac(cfg: dict, name: str = "db") -> dict:
    return {
        "@type": T + "envoy.config.listener.v3.Listener",
        "name": name,
        "address": {"socket_address": {"address": "198.18.2.10", "port_value": 5432}},
        "filter_chains": [{"filters": [
            {"name": "envoy.filters.network.rbac", "typed_config": {"@type": NET_RBAC, **cfg}},
            {"name": "tcp", "typed_config": {"@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                             "stat_prefix": "db", "cluster": "pass"}}]}],
    }  # fmt: skip


def test_istio_tcp_policy_translates_and_evaluates() -> None:
    snap = translate(to_resources([tcp_with_rbac(ISTIO_TCP), PASS]), PLANES)
    (lsn,) = snap.listeners
    (rbac,) = lsn.network_rbac
    assert isinstance(rbac, RbacFilter) and rbac.action == "allow"

    def facts(src="198.18.2.5", port=5432, peer=None):
        return RequestFacts({}, "", "198.18.2.10", port, src, peer, "media")

    assert evaluate(rbac, facts())[0] is True
    assert evaluate(rbac, facts(src="198.18.1.5"))[0] is False
    assert evaluate(rbac, facts(src="198.18.1.5", peer=AMF))[0] is True
    assert evaluate(rbac, facts(port=5433))[0] is False
    # the data path: this TCP chain goes to the plane's sniffing listener, not the kernel bypass
    policy = policy_from_snapshot(snap)
    media = next(p for p in snap.planes if p.name == "media")
    assert policy.rules[PolicyRule(media.plane_id, 5432)] is Action.SNIFF
    assert needs_sniff_listener(snap, media)


def test_shadow_only_network_rbac_is_noted_and_bypassed() -> None:
    shadow = {"stat_prefix": "tcp.", "shadow_rules": {"action": "DENY"}}
    snap = translate(to_resources([tcp_with_rbac(shadow), PASS]), PLANES)
    assert snap.listeners[0].network_rbac == ()
    media = next(p for p in snap.planes if p.name == "media")
    assert policy_from_snapshot(snap).rules[PolicyRule(media.plane_id, 5432)] is Action.BYPASS


@pytest.mark.parametrize(
    ("cfg", "where"),
    [
        ({"rules": {"policies": {"p": {"permissions": [{"header": {"name": ":method", "exact_match": "GET"}}],
                                       "principals": [{"any": True}]}}}}, "permissions[0].header"),
        ({"rules": {"policies": {"p": {"permissions": [{"any": True}],
                                       "principals": [{"url_path": {"path": {"exact": "/"}}}]}}}},
         "principals[0].url_path"),
        ({"rules": {"policies": {"p": {"permissions": [{"any": True}], "principals": [
            {"filter_state": {"key": "io.istio.peer_principal", "string_match": {"exact": "x"}}}]}}}},
         "filter_state.key"),
        ({"rules": {}, "enforcement_type": "CONTINUOUS"}, "enforcement_type"),
        ({"rules": {}, "delay_deny": "1s"}, "delay_deny"),
        ({"rules": {"action": "LOG"}}, "rules.action"),
    ],
)  # fmt: skip
def test_what_a_tcp_connection_cannot_be_checked_against_is_refused(cfg, where) -> None:
    with pytest.raises(ConfigError) as err:
        translate(to_resources([tcp_with_rbac({"stat_prefix": "t", **cfg}), PASS]), PLANES)
    assert where in str(err.value) and "listener[db]" in str(err.value)


def test_network_rbac_on_http_chains_stays_refused() -> None:
    flt = {"name": "envoy.filters.network.rbac", "typed_config": {"@type": NET_RBAC, **ISTIO_TCP}}
    doc = http_listener()
    doc["filter_chains"][0]["filters"].insert(0, flt)
    with pytest.raises(ConfigError, match="RBAC enforcement is not supported"):
        translate(to_resources([doc, PASS]), PLANES)
