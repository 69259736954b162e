"""A plane SLA's mTLS mode governs the chains of listeners that are not OUTBOUND: Envoy's traffic_direction is
carried from xDS into the model, and the chains (tls.py plane_tcp_chains, TlsRoutes), the sniffing listener's
mode (TlsRoutes.mode_for) and the kernel's bypass (ebpf/policy.py) leave OUTBOUND chains as xDS says. Before,
traffic_direction was ignored and a strict plane took a pod's egress (kube-dns :53...) out of the bypass."""

from __future__ import annotations

from dataclasses import replace

import pytest

from planemesh.agent.proxy.tls import TlsRoutes, plane_tcp_chains
from planemesh.ebpf.abi import Action
from planemesh.ebpf.policy import PolicyRule, needs_sniff_listener, policy_from_snapshot
from planemesh.model.config import ConfigError, Listener, ListenerProtocol, TrafficDirection
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import SLA
from planemesh.model.tls_config import TlsContext
from planemesh.xds import conformance
from planemesh.xds.translate import translate
from tests.unit.test_istio_conformance import _whole_push, loaded  # noqa: F401 (fixture)
from tests.unit.test_plane_mtls_config import static_snapshot
from tests.unit.test_xds_istio_translate import hcm, listener, run, tcp
from tests.unit.test_xds_translate import PASS, PLANES, to_resources

pytestmark = pytest.mark.unit

OUT, IN, UNSET = TrafficDirection.OUTBOUND, TrafficDirection.INBOUND, TrafficDirection.UNSPECIFIED
STRICT = SLA(mtls="strict", mtls_cert="c", mtls_trust="r")


@pytest.mark.parametrize(("field", "direction"), [("OUTBOUND", OUT), ("INBOUND", IN), (None, UNSET)])
def test_traffic_direction_is_carried_to_every_chain(field, direction) -> None:
    extra = {"traffic_direction": field} if field else {}
    doc = listener([{"filters": [tcp()]}, {"filter_chain_match": {"destination_port": 9081}, "filters": [hcm()]}],
                   name="0.0.0.0_9080", **extra)  # fmt: skip
    snap, _notes = run([doc])
    assert {lsn.direction for lsn in snap.listeners} == {direction} and len(snap.listeners) >= 2


def test_an_unknown_traffic_direction_is_refused_by_name() -> None:
    doc = listener([{"filters": [tcp()]}], name="l", traffic_direction=7)
    with pytest.raises(ConfigError, match=r"listener\[l\]\.traffic_direction: 7"):
        translate(to_resources([doc, PASS]), PLANES)


def _with(snap, *listeners: Listener):
    return replace(snap, listeners=snap.listeners + listeners)


def test_a_strict_planes_outbound_tcp_chain_keeps_the_kernel_bypass() -> None:
    """kube-dns :53 through istiod's outbound listener stays bypassed on a strict plane; an inbound chain and a
    static one (no direction) are handed to the plane's proxy."""
    snap = static_snapshot(mtls="strict")
    dns = Listener("0.0.0.0_53", "oam", 53, ListenerProtocol.TCP, direction=OUT)
    inbound = Listener("inbound|9100", "oam", 9100, ListenerProtocol.TCP, direction=IN)
    rules = policy_from_snapshot(_with(snap, dns, inbound)).rules
    assert rules[PolicyRule(1, 53)] is Action.BYPASS
    assert rules[PolicyRule(1, 9100)] is Action.SNIFF and rules[PolicyRule(1, 9000)] is Action.SNIFF
    only_out = replace(snap, listeners=(dns,))
    assert not needs_sniff_listener(only_out, only_out.planes[0])  # nothing of the plane's is inspected
    assert needs_sniff_listener(replace(snap, listeners=(inbound,)), snap.planes[0])


TCP = ListenerProtocol.TCP
XDS_TLS = TlsContext(cert="default", trust="ROOTCA", require_client_cert=True)


@pytest.mark.parametrize("mode", ["strict", "permissive", "disable"])
def test_outbound_tcp_chains_are_as_xds_says_whatever_the_mode(mode) -> None:
    egress = Listener("egress", "oam", 53, TCP, direction=OUT)
    egress_tls = Listener("egress-tls", "oam", 8443, TCP, tls=XDS_TLS, transport_protocol="tls", direction=OUT)
    inbound = Listener("db", "oam", 9000, TCP, direction=IN)
    out = plane_tcp_chains((egress, egress_tls, inbound), replace(STRICT, mtls=mode))
    assert out[0] is egress and out[1] is egress_tls  # untouched, no twin
    names = [lsn.name for lsn in out[2:]]
    assert names == {"strict": ["db~mtls"], "permissive": ["db", "db~mtls"], "disable": ["db"]}[mode]


def test_the_sniffing_listener_and_http_ports_skip_outbound_destinations() -> None:
    """Port 8090: istiod's outbound listener for any destination, and an inbound one for the local pod. The
    pod's egress (any other address) is not the plane's; the pod's inbound is; an undeclared port is."""
    snap = static_snapshot(mtls="strict")
    out = Listener("0.0.0.0_8090", "oam", 8090, ListenerProtocol.HTTP, route_config=None, direction=OUT)
    pod = replace(out, name="inbound|8090", prefixes=(IPNetwork("198.18.1.20/32"),), direction=IN)
    routes = TlsRoutes(_with(snap, out, pod), "oam", {})
    assert routes.mode_for("198.18.1.30", 8090) == ""  # egress: as xDS says (no TLS chain: plain HTTP)
    assert routes.decide("198.18.1.30", 8090) is None
    assert routes.mode_for("198.18.1.20", 8090) == "strict"
    decision = routes.decide("198.18.1.20", 8090)
    assert decision is not None and decision.listener.name == "inbound|8090~mtls" and not decision.plaintext
    assert routes.mode_for("198.18.1.30", 8091) == "strict"  # undeclared: no direction, the plane's mode
    assert TlsRoutes(_with(static_snapshot(), out), "oam", {}).mode_for("198.18.1.30", 8090) == ""


def test_istiods_push_on_a_strict_plane_keeps_kube_dns_bypassed(loaded) -> None:  # noqa: F811
    """The istiod corpus (tests/xds/istio_corpus): kube-dns's VIP listener is OUTBOUND, virtualInbound's 9090
    chain INBOUND; on a strict plane the first keeps the kernel bypass (before: SNIFF, then refused), the
    second is the plane's proxy's (it is already: its cluster is inbound|9090||)."""
    pod, *rest = conformance.PLANES
    strict = (replace(pod, sla=replace(pod.sla, mtls="strict")), *rest)
    for planes in (conformance.PLANES, strict):
        snap = translate(_whole_push(loaded), planes)
        dns = next(lsn for lsn in snap.listeners_of("pod") if lsn.port == 53)
        inbound = next(lsn for lsn in snap.listeners_of("pod") if lsn.port == 9090 and lsn.tls is None)
        assert (dns.direction, inbound.direction) == (OUT, IN)
        rules = policy_from_snapshot(snap).rules
        assert rules[PolicyRule(1, 53, "10.96.0.10/32")] is Action.BYPASS
        assert rules[PolicyRule(1, 9090)] is Action.SNIFF


def test_disable_ignores_governed_tls_http_listeners_only() -> None:
    snap = static_snapshot(mtls="disable")
    out = Listener("egress-tls", "oam", 8443, ListenerProtocol.HTTP, tls=XDS_TLS, direction=OUT)
    routes = TlsRoutes(_with(snap, out, replace(out, name="in-tls", port=8444, direction=IN)), "oam", {})
    assert sorted(routes.ports) == [8443]  # the OUTBOUND one terminates TLS as xDS says
