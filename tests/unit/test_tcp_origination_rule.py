"""Translation and the kernel/proxy decision for relayed TCP that originates TLS (Istio auto-mTLS) and for the
TCP chain behind an HTTP chain (an auto-protocol port).

- A tcp_proxy chain whose cluster reaches an endpoint over TLS (istiod's `tlsMode: istio` match, its SDS
  secrets served) is relayed by the proxy even where the kernel could bypass it (istiod's own-service chain):
  the bypass would send plaintext. Without the secrets the plaintext match is kept and so is the bypass.
- istiod's auto-protocol listener (an HTTP chain matched on `application_protocols` plus a TCP chain) becomes
  one sniffed HTTP listener that carries the TCP chain's clusters; the sniffing listener relays what is not
  HTTP there (sni_routing.py `behind_http`), except where the cluster would pick the original destination
  and originates no TLS. Before, the TCP chain was dropped (noted) and its bytes went to the original
  destination.
"""

from __future__ import annotations

import dataclasses

import pytest

from planemesh.agent.identity.ca import new_root, utcnow
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.agent.proxy.sni_routing import SniRoutes
from planemesh.ebpf.abi import Action
from planemesh.ebpf.policy import PolicyRule, policy_from_snapshot, tcp_handling
from planemesh.model.config import ListenerProtocol
from planemesh.xds.sds import root_secret, tls_certificate_secret
from planemesh.xds.translate import translate
from tests.unit.test_xds_istio_translate import PASS, PLANES, RAW, T, hcm, listener, tcp
from tests.unit.test_xds_translate import to_resources

VIP, PORT = "10.96.5.5", 5000
DB = f"outbound|{PORT}||db.default.svc.cluster.local"
OTHER = f"outbound|{PORT}|v2|db.default.svc.cluster.local"  # a DestinationRule subset
NOW = utcnow()
OAM = PLANES[0]
SDS = {"ads": {}, "resource_api_version": "V3"}
MTLS = {
    "name": "tls",
    "typed_config": {
        "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": f"outbound_.{PORT}_._.db.default.svc.cluster.local",
        "common_tls_context": {
            "alpn_protocols": ["istio-peer-exchange", "istio"],
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": SDS}],
            "combined_validation_context": {
                "default_validation_context": {"match_subject_alt_names": [
                    {"exact": "spiffe://cluster.local/ns/default/sa/db"}]},
                "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": SDS}},
        },
    },
}  # fmt: skip


def auto_mtls(name: str, istio: bool = True) -> dict:
    """istiod's outbound cluster: `tlsMode: istio` -> mTLS, else the plaintext `tlsMode-disabled` match."""
    meta = {"filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}} if istio else {}
    lbe = {"endpoint": {"address": {"socket_address": {"address": "198.18.1.20", "port_value": PORT}}},
           "metadata": meta}  # fmt: skip
    return {
        "@type": T + "envoy.config.cluster.v3.Cluster", "name": name, "type": "STATIC",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [lbe]}]},
        "transport_socket_matches": [
            {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": MTLS},
            {"name": "tlsMode-disabled", "match": {}, "transport_socket": RAW},
        ],
    }  # fmt: skip


def secrets() -> dict:
    root = new_root("cluster.local", now=NOW)
    issued = root.issue(parse_spiffe_id("spiffe://cluster.local/ns/default/sa/client"), now=NOW)
    return {"default": tls_certificate_secret(issued), "ROOTCA": root_secret(root.root_pem())}


def run(docs: list[dict], served: bool):
    res = to_resources([*docs, PASS])
    res = dataclasses.replace(res, secrets=secrets() if served else {})
    return translate(res, PLANES)


def vip_tcp(cluster: str) -> dict:
    return listener([{"filters": [tcp(cluster)]}], name=f"{VIP}_{PORT}", address=VIP, port=PORT, bind_to_port=False)


def auto_protocol(cluster: str) -> dict:
    """istiod's outbound listener of a port of unknown protocol: HTTP (sniffed) + TCP, PassthroughCluster last."""
    http = {"filter_chain_match": {"transport_protocol": "raw_buffer",
                                   "application_protocols": ["http/1.1", "http/1.0", "h2c"]},
            "filters": [hcm()]}  # fmt: skip
    return listener([http, {"filters": [tcp(cluster)]}], name=f"{VIP}_{PORT}", address=VIP, port=PORT,
                    bind_to_port=False, default={"filters": [tcp("pass")]})  # fmt: skip


def rule(snap) -> Action:
    return policy_from_snapshot(snap).rules[PolicyRule(OAM.plane_id, PORT, f"{VIP}/32")]


@pytest.mark.parametrize(
    ("served", "istio", "action"),
    [(True, True, Action.SNIFF), (False, True, Action.BYPASS), (True, False, Action.BYPASS)],
    ids=["mtls-served", "no-secrets-plaintext-match", "endpoint-not-istio"],
)
def test_own_service_chain_is_relayed_when_an_endpoint_is_reached_over_tls(served, istio, action) -> None:
    snap = run([vip_tcp(DB), auto_mtls(DB, istio)], served)
    (lsn,) = [lsn for lsn in snap.listeners_of(OAM.name) if lsn.port == PORT]
    assert lsn.own_service  # istiod's default chain of the service: bypassed unless TLS must be originated
    bypass, why = tcp_handling(lsn, snap.clusters)
    assert rule(snap) is action and bypass is (action is Action.BYPASS), why
    if action is Action.SNIFF:
        assert "originates TLS" in why


def test_auto_protocol_listener_carries_its_tcp_chains_cluster() -> None:
    snap = run([auto_protocol(OTHER), auto_mtls(OTHER, istio=False)], served=False)
    (lsn,) = [lsn for lsn in snap.listeners_of(OAM.name) if lsn.port == PORT]
    assert lsn.protocol is ListenerProtocol.HTTP and lsn.sniff
    assert [w.name for w in lsn.tcp_clusters] == [OTHER] and not lsn.own_service  # not the PassthroughCluster
    assert rule(snap) is Action.SNIFF
    chain = SniRoutes(snap.listeners_of(OAM.name), snap.clusters).behind_http(PORT, VIP)
    assert chain is not None and chain.action is not None and chain.action.cluster == OTHER
    assert not SniRoutes(snap.listeners_of(OAM.name), snap.clusters).declares(PORT)  # HTTP still goes to the L7 proxy


@pytest.mark.parametrize(("served", "relayed"), [(False, False), (True, True)], ids=["plaintext", "mtls"])
def test_auto_protocol_own_service_keeps_the_original_destination_unless_tls(served, relayed) -> None:
    """istiod's own-service TCP chain behind the HTTP chain: the service address is its cluster's choice, so
    non-HTTP bytes go to the original destination, unless the endpoint's match says mTLS."""
    snap = run([auto_protocol(DB), auto_mtls(DB)], served)
    (lsn,) = [lsn for lsn in snap.listeners_of(OAM.name) if lsn.port == PORT]
    assert lsn.own_service and [w.name for w in lsn.tcp_clusters] == [DB]
    chain = SniRoutes(snap.listeners_of(OAM.name), snap.clusters).behind_http(PORT, VIP)
    assert (chain is not None) is relayed
    assert SniRoutes(snap.listeners_of(OAM.name)).behind_http(PORT, VIP) is None  # no clusters: nothing relayed


def test_blackhole_tcp_chain_is_not_carried() -> None:
    """REGISTRY_ONLY: the TCP chain goes to BlackHoleCluster, the HTTP listener is not sniffed (unchanged)."""
    blackhole = {"@type": T + "envoy.config.cluster.v3.Cluster", "name": "BlackHoleCluster", "type": "STATIC"}
    http = {"filter_chain_match": {"application_protocols": ["http/1.1"]}, "filters": [hcm()]}
    doc = listener([http, {"filters": [tcp("BlackHoleCluster")]}], name=f"0.0.0.0_{PORT}", port=PORT)
    snap = run([doc, blackhole], served=False)
    (lsn,) = [lsn for lsn in snap.listeners_of(OAM.name) if lsn.port == PORT]
    assert not lsn.sniff and lsn.tcp_clusters == ()


def test_original_dst_cluster_with_tls_is_relayed() -> None:
    """A passthrough cluster is a kernel bypass, unless its own transport_socket says TLS."""
    passthrough = {"@type": T + "envoy.config.cluster.v3.Cluster", "name": "tls-pass", "type": "ORIGINAL_DST",
                   "lb_policy": "CLUSTER_PROVIDED", "transport_socket": MTLS}  # fmt: skip
    snap = run([vip_tcp("tls-pass"), passthrough], served=True)
    (lsn,) = [lsn for lsn in snap.listeners_of(OAM.name) if lsn.port == PORT]
    assert tcp_handling(lsn, snap.clusters)[0] is False and rule(snap) is Action.SNIFF
    assert rule(run([vip_tcp("pass")], served=True)) is Action.BYPASS
