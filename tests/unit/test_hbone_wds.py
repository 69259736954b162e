"""istio's WDS for the HBONE node (agent/hbone/wds.py, authz.py, xds/istio_wds.py): pure logic.

Workloads become local identities or per-peer /32 routes; Authorization policies are scoped and evaluated as
ztunnel does; a bad resource is NACKed naming it and field, the others applied, the bad one keeping its last
accepted version; resource files with the istio types are read by the management server's loader."""

from __future__ import annotations

import ipaddress
import re

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from planemesh.agent.hbone.authz import Authz, Destination, authorize, connection
from planemesh.agent.hbone.routes import Peer, Routes
from planemesh.agent.hbone.wds import WdsError, WdsState, address_entry, authorization_policy
from planemesh.xds import istio_wds as w
from planemesh.xds.resources import load_resource_dir, pack

STATIC = Routes({}, (Peer("node-b", ("10.81.0.2", 15008), ()),))
AMF = "spiffe://cluster.local/ns/ran/sa/amf"


def workload(uid: str, ip: bytes, node: str, *, ns: str = "ran", sa: str = "amf", hbone: bool = True) -> w.Address:
    msg = w.Address()
    wl = msg.workload
    wl.uid, wl.namespace, wl.service_account, wl.node = uid, ns, sa, node
    wl.addresses.append(ip)
    wl.tunnel_protocol = w.HBONE if hbone else 0
    return msg


def policy(name: str, action: int, scope: int = w.GLOBAL, ns: str = "ran", **match) -> w.Authorization:  # type: ignore[no-untyped-def]
    msg = w.Authorization(name=name, namespace=ns, action=action, scope=scope)
    m = msg.rules.add().clauses.add().matches.add()
    for key, values in match.items():
        for v in values:
            if key.endswith("ports"):
                getattr(m, key).append(v)
            elif key.endswith("ips"):
                getattr(m, key).add(address=ipaddress.ip_address(v[0]).packed, length=v[1])
            else:
                getattr(m, key).add(**v)
    return msg


def test_workloads_become_local_identities_and_peer_routes() -> None:
    peers = frozenset({"node-b"})
    local = address_entry("a", workload("a", bytes([10, 81, 1, 2]), "node-a"), "node-a", peers)
    assert local.local["10.81.1.2"].identity == AMF
    remote = address_entry("b", workload("b", bytes([10, 81, 2, 2]), "node-b"), "node-a", peers)
    assert remote.peer == "node-b" and remote.routes == (ipaddress.ip_network("10.81.2.2/32"),)
    v6 = address_entry("b6", workload("b6", ipaddress.ip_address("fd81:2::2").packed, "node-b"), "node-a", peers)
    assert v6.routes == (ipaddress.ip_network("fd81:2::2/128"),)
    plain = address_entry("c", workload("c", bytes([10, 81, 2, 3]), "node-b", hbone=False), "node-a", peers)
    assert plain.peer is None and not plain.local  # not HBONE: not ours
    elsewhere = address_entry("d", workload("d", bytes([10, 9, 9, 9]), "node-z"), "node-a", peers)
    assert elsewhere.peer is None and not elsewhere.local


@pytest.mark.parametrize(("msg", "error"), [
    (workload("x", bytes([10, 81, 1]), "node-a"), "Address 'x': workload.addresses[0]: 3 bytes"),
    (workload("x", bytes([10, 81, 1, 2]), "node-a", ns=""), "Address 'x': workload.namespace: empty"),
])  # fmt: skip
def test_bad_workloads_name_resource_and_field(msg: w.Address, error: str) -> None:
    with pytest.raises(WdsError, match=re.escape(error)):
        address_entry("x", msg, "node-a", frozenset({"node-b"}))


def test_a_workload_behind_a_waypoint_is_refused() -> None:
    msg = workload("x", bytes([10, 81, 2, 2]), "node-b")
    msg.workload.waypoint.hbone_mtls_port = 15008
    with pytest.raises(WdsError, match=r"Address 'x': workload.waypoint: not supported"):
        address_entry("x", msg, "node-a", frozenset({"node-b"}))


def test_authorization_refuses_source_ips_and_fields_it_cannot_read() -> None:
    with pytest.raises(WdsError, match=r"rules\[0\].clauses\[0\].matches\[0\].source_ips: not supported"):
        authorization_policy("ran/p", policy("p", w.DENY, source_ips=[("10.81.1.2", 32)]))
    newer = policy("p", w.ALLOW)
    newer.rules[0].clauses[0].matches[0].MergeFromString(bytes([0x5A, 0x02, 0x0A, 0x00]))  # field 11 (a newer API)
    with pytest.raises(WdsError, match="carries fields planemesh does not read"):
        authorization_policy("ran/p", newer)


def test_authorize_as_ztunnel_deny_first_then_allow_scoped() -> None:
    amf = [{"exact": "cluster.local/ns/ran/sa/amf"}]
    deny_amf = authorization_policy("ran/deny", policy("deny", w.DENY, principals=amf, destination_ports=[8081]))
    allow_ns = authorization_policy("ran/allow", policy("allow", w.ALLOW, w.NAMESPACE, namespaces=[{"exact": "ran"}]))
    selected = authorization_policy("core/only-smf", policy("only-smf", w.ALLOW, w.WORKLOAD_SELECTOR, ns="core",
                                                             principals=[{"suffix": "/sa/smf"}]))  # fmt: skip
    pols = [deny_amf, allow_ns, selected]
    ran, core_sel, core = Destination("ran"), Destination("core", frozenset({"core/only-smf"})), Destination("core")
    assert authorize(pols, ran, connection(AMF, "10.81.2.2", 8080)) == (True, "ran/allow")
    assert authorize(pols, ran, connection(AMF, "10.81.2.2", 8081)) == (False, "ran/deny")
    other_ns = "spiffe://cluster.local/ns/edge/sa/upf"
    assert authorize(pols, ran, connection(other_ns, "10.81.2.2", 8080)) == (False, "no ALLOW policy matched")
    assert authorize(pols, core, connection(other_ns, "10.81.2.9", 8080)) == (True, None)  # no policy applies
    assert authorize(pols, core_sel, connection(AMF, "10.81.2.9", 8080))[0] is False
    assert authorize(pols, core_sel, connection("spiffe://td/ns/core/sa/smf", "10.81.2.9", 8080))[0] is True
    no_rules = authorization_policy("ran/empty", w.Authorization(name="empty", namespace="ran"))
    assert authorize([no_rules], ran, connection(AMF, "10.81.2.2", 1))[0] is False  # ALLOW nothing
    nets = authorization_policy("ran/d", policy("d", w.DENY, not_destination_ips=[("10.81.2.0", 24)]))
    assert authorize([nets], ran, connection(AMF, "10.81.2.2", 1))[0] is True
    assert authorize([nets], ran, connection(AMF, "10.81.3.2", 1))[0] is False


def response(type_url: str, version: str, msgs: list, nonce: str = "n") -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version, nonce=nonce,
                                           resources=[pack(m) for m in msgs])  # fmt: skip


def test_state_acks_builds_the_table_and_nacks_a_bad_resource_keeping_its_last_version() -> None:
    state = WdsState("planemesh-hbone~node-a", "node-a", STATIC)
    assert [r.type_url for r in state.initial_requests()] == [w.ADDRESS_TYPE, w.AUTHORIZATION_TYPE]
    a = workload("a", bytes([10, 81, 1, 2]), "node-a")
    b = workload("b", bytes([10, 81, 2, 2]), "node-b")
    ack, changed = state.on_response(response(w.ADDRESS_TYPE, "1", [a, b]))
    assert changed and ack.version_info == "1" and not ack.HasField("error_detail") and ack.response_nonce == "n"
    routes = state.table.routes
    assert routes.identity_of("10.81.1.2") == AMF and routes.peer_for("10.81.2.2").name == "node-b"
    assert routes.peer_for("10.81.2.3") is None

    bad_b = workload("b", bytes([10, 81, 2]), "node-b")
    c = workload("c", bytes([10, 81, 2, 3]), "node-b")
    nack, changed = state.on_response(response(w.ADDRESS_TYPE, "2", [a, bad_b, c], nonce="m"))
    assert nack.version_info == "1" and nack.response_nonce == "m"
    assert "Address 'b': workload.addresses[0]: 3 bytes" in nack.error_detail.message
    assert changed and state.table.routes.peer_for("10.81.2.2").name == "node-b"  # b's last good version
    assert state.table.routes.peer_for("10.81.2.3").name == "node-b"  # c applied

    deny = policy("deny", w.DENY, principals=[{"exact": "cluster.local/ns/ran/sa/amf"}])
    ack, changed = state.on_response(response(w.AUTHORIZATION_TYPE, "7", [deny]))
    assert changed and ack.version_info == "7"
    assert isinstance(state.table.authz, Authz)
    assert state.table.authz.check(AMF, "10.81.1.2", 8080) == (False, "ran/deny")
    ack, changed = state.on_response(response(w.AUTHORIZATION_TYPE, "8", []))
    assert changed and state.table.authz.check(AMF, "10.81.1.2", 8080) == (True, None)  # removed: allowed


def test_resource_files_with_istio_types_load_by_their_xds_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "wds.yaml").write_text(
        "- {'@type': type.googleapis.com/istio.workload.Address,"
        "   workload: {uid: c1/pod-b, namespace: ran, node: node-b, addresses: [ClECAg==], tunnelProtocol: HBONE}}\n"
        "- {'@type': type.googleapis.com/istio.security.Authorization, name: deny-amf, namespace: ran, action: DENY,"
        "   rules: [{clauses: [{matches: [{principals: [{exact: cluster.local/ns/ran/sa/amf}]}]}]}]}\n"
    )
    loaded = load_resource_dir(tmp_path)
    assert list(loaded[w.ADDRESS_TYPE]) == ["c1/pod-b"]
    assert list(loaded[w.AUTHORIZATION_TYPE]) == ["ran/deny-amf"]
