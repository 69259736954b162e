"""istiod's sidecar resources (tests/xds/istio_corpus) against planemesh and the real Envoy 1.40.

The conformance table in docs/ is regenerated and compared; Envoy runs (`--mode validate`) for a sample of
the corpus and must agree with the cached verdicts; planemesh must accept every resource Envoy accepts except
the known gaps named here; and the whole push translates into one valid Snapshot with the expected mapping.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import MappingProxyType

import pytest

from planemesh.agent.identity.ca import new_root
from planemesh.agent.identity.spiffe import parse_spiffe_id
from planemesh.ebpf.abi import Action
from planemesh.ebpf.policy import PolicyRule, needs_sniff_listener, policy_from_snapshot
from planemesh.model.config import FaultFilter, ListenerProtocol
from planemesh.model.ip import IPNetwork
from planemesh.xds import conformance
from planemesh.xds.client_state import XdsResources
from planemesh.xds.per_resource import translate_update
from planemesh.xds.sds import root_secret, tls_certificate_secret
from planemesh.xds.translate import translate

ENVOY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "envoy"
# Envoy accepts these and planemesh refuses them, on purpose (docs/istio-conformance.md says why).
KNOWN_GAPS: set[str] = set()
SAMPLE = {"virtualInbound", "9080-vs", "outbound|9080||ratings.default.svc.cluster.local", "BlackHoleCluster"}


@pytest.fixture(scope="module")
def loaded():
    rows = conformance.load_corpus()
    conformance.planemesh_verdicts(rows)
    conformance.envoy_verdicts([r for r, _ in rows], None, conformance.CORPUS / "envoy_verdicts.json", False)
    return rows


def test_the_table_in_docs_is_current():
    assert conformance.build() == conformance.DOC.read_text(), (
        "docs/istio-conformance.md is stale: python -m planemesh.xds.conformance --write docs/istio-conformance.md"
    )


def test_every_resource_has_an_envoy_verdict(loaded):
    missing = [r.name for r, _ in loaded if r.envoy == "?"]
    assert not missing, f"run with --envoy to validate: {missing}"


def test_the_real_envoy_agrees_with_the_cached_verdicts_on_a_sample(loaded):
    sample = [r for r, _ in loaded if r.name in SAMPLE]
    assert len(sample) >= len(SAMPLE)  # a ClusterLoadAssignment and a Cluster may share a name
    for row in sample:
        assert conformance.envoy_verdict(str(ENVOY), row.kind, row.raw) == row.envoy, row.name


def test_the_real_envoy_rejects_what_it_should():
    """The oracle is live: a broken resource is rejected, naming the reason."""
    bad = {
        "name": "x",
        "type": "EDS",
        "lb_policy": "CLUSTER_PROVIDED",
        "eds_cluster_config": {"eds_config": {"ads": {}}},
    }
    verdict = conformance.envoy_verdict(str(ENVOY), "Cluster", bad)
    assert verdict.startswith("rejected: ") and "cluster provided LB" in verdict


def test_planemesh_accepts_every_resource_envoy_accepts_but_the_known_gaps(loaded):
    refused = {r.name: r.planemesh for r, _ in loaded if r.envoy == "accepted" and r.planemesh != "accepted"}
    assert set(refused) == KNOWN_GAPS, refused


def test_istio_extensions_are_carried_not_refused(loaded):
    notes = [why for r, _ in loaded for _path, why in r.ignored]
    for ext in ("istio.stats", "istio.metadata_exchange", "istio_authn", "peer metadata"):
        assert any(why.startswith(ext) for why in notes), ext


_NOW = dt.datetime.now(dt.UTC)
_ROOT = new_root("cluster.local", now=_NOW)
_SECRETS = {
    "default": tls_certificate_secret(_ROOT.issue(parse_spiffe_id("spiffe://cluster.local/ns/default/sa/x"), now=_NOW)),
    "ROOTCA": root_secret(_ROOT.root_pem()),
}


def _whole_push(loaded) -> XdsResources:
    kinds = {"Listener": {}, "RouteConfiguration": {}, "Cluster": {}, "ClusterLoadAssignment": {}}
    for row, msg in loaded:
        if row.name not in KNOWN_GAPS:
            kinds[row.kind][row.name] = msg
    return XdsResources(
        listeners=MappingProxyType(kinds["Listener"]),
        routes=MappingProxyType(kinds["RouteConfiguration"]),
        clusters=MappingProxyType(kinds["Cluster"]),
        endpoints=MappingProxyType(kinds["ClusterLoadAssignment"]),
        versions=MappingProxyType({"LDS": "1"}),
        secrets=MappingProxyType(_SECRETS),  # what `planemesh xds-server --ca` serves (istio-agent's SDS)
    )


def test_the_whole_push_is_one_valid_snapshot_with_istio_semantics(loaded):
    snap = translate(_whole_push(loaded), conformance.PLANES)
    # no two listeners for one plane/port/destination, but a permissive port's TLS chain (mTLS terminated)
    tls = {(lsn.plane, lsn.port, lsn.prefixes): lsn for lsn in snap.listeners if lsn.tls is not None}
    by_key = {(lsn.plane, lsn.port, lsn.prefixes): lsn for lsn in snap.listeners if lsn.tls is None}
    assert len(by_key) + len(tls) == len(snap.listeners)
    assert not {lsn.port for lsn in snap.listeners} & {15001, 15006}  # the capture listeners dispatch only
    for plane in ("pod", "media"):  # every plane: the plane is where a connection arrives, not an address
        outbound_http = by_key[(plane, 9080, ())]
        assert outbound_http.route_config == "9080" and outbound_http.protocol is ListenerProtocol.HTTP
        assert outbound_http.sniff  # the PassthroughCluster default chain: non-HTTP passes through
        dns = by_key[(plane, 53, (IPNetwork("10.96.0.10/32"),))]  # a VIP listener that does not bind
        assert dns.protocol is ListenerProtocol.TCP and dns.tcp_clusters[0].name.startswith("outbound|53||")
        assert by_key[(plane, 443, (IPNetwork("10.96.0.1/32"),))]  # many VIPs on one port: no conflict
        assert by_key[(plane, 443, (IPNetwork("10.96.12.34/32"),))]
        auto = by_key[(plane, 5000, (IPNetwork("10.96.7.7/32"),))]
        assert auto.sniff and auto.route_config == "metrics.default.svc.cluster.local:5000"
        # 5 chains (mTLS/plain x HTTP/TCP, plain TLS) -> one sniffed plaintext listener and one sniffed mTLS one:
        # the sniffer terminates a ClientHello offering istio's ALPN, then sniffs inside (agent/proxy/sniff_tls.py)
        inbound_auto = by_key[(plane, 9091, ())]
        assert inbound_auto.sniff and inbound_auto.route_config == "inbound|9091||"
        mtls_auto = tls[(plane, 9091, ())]
        assert mtls_auto.sniff and mtls_auto.route_config == "inbound|9091||"
        assert {"istio-peer-exchange", "istio", "istio-h2", "istio-http/1.1"} <= set(mtls_auto.application_protocols)
        inbound_tcp = by_key[(plane, 9090, ())]  # virtualInbound's port chain (raw_buffer twin of mTLS)
        assert inbound_tcp.protocol is ListenerProtocol.TCP and inbound_tcp.tcp_clusters[0].name == "inbound|9090||"
    ratings = snap.routes["9080-vs"].virtual_hosts[1].routes[0]
    assert ratings.fault == FaultFilter(delay_s=2.0, delay_percent=10.0, abort_status=503, abort_percent=10.0)
    split = snap.routes["9080-vs"].virtual_hosts[0].routes[0].action.weighted
    assert [(w.name.split("|")[2], w.weight) for w in split] == [("v1", 80), ("v3", 20)]
    retry = snap.routes["9080"].virtual_hosts[0].routes[0].action.retry
    assert retry.retry_on == {"connect-failure", "reset", "retriable-status-codes"} and retry.num_retries == 2
    assert snap.clusters["BlackHoleCluster"].endpoints == ()
    istiod = snap.clusters["outbound|15012||istiod.istio-system.svc.cluster.local"]
    # h2 upstream with Istio auto-mTLS: tlsMode=istio endpoints over mTLS too (h2 over TLS, h2_upstream.py)
    assert istiod.http2 and istiod.tls is None and [m.labels for m in istiod.tls_matches] == [(("tlsMode", "istio"),)]
    ratings = snap.clusters["outbound|9080||ratings.default.svc.cluster.local"]  # Istio auto-mTLS, HTTP/1.1
    assert ratings.tls is None and [m.labels for m in ratings.tls_matches] == [(("tlsMode", "istio"),)]
    assert {e.tls_socket for e in ratings.endpoints} == {0}  # the tlsMode=istio endpoints: mTLS
    assert set(snap.secrets) == {"default", "ROOTCA"}
    assert snap.clusters["outbound|9080||ratings.default.svc.cluster.local"].outlier.consecutive_5xx == 3
    policy = policy_from_snapshot(snap)
    assert policy.rules[PolicyRule(1, 9080)] is Action.SNIFF
    assert policy.rules[PolicyRule(1, 9091)] is Action.SNIFF  # the mTLS twin too: one action per port
    assert policy.rules[PolicyRule(1, 53, "10.96.0.10/32")] is Action.BYPASS
    # a VirtualService tcp route to subset v2 (chain metadata istio.config): relayed to the subset, not bypassed
    assert policy.rules[PolicyRule(1, 3306, "10.96.9.9/32")] is Action.SNIFF
    assert needs_sniff_listener(snap, snap.plane("pod"))


def test_per_resource_application_drops_shadowed_inbound_chains_as_the_whole_push_does(loaded):
    """Regression: per_resource.py did not apply drop_shadowed_inbound, so virtualInbound's 9080 chain clashed
    with 0.0.0.0_9080 and the whole virtualInbound listener was NACKed."""
    push = _whole_push(loaded)
    whole = translate(push, conformance.PLANES)
    each = translate_update(push, conformance.PLANES)
    assert dict(each.rejected) == {} and each.warming == ()
    assert sorted(lsn.name for lsn in each.snapshot.listeners) == sorted(lsn.name for lsn in whole.listeners)
    assert each.snapshot.listeners and set(each.snapshot.listeners) == set(whole.listeners)
