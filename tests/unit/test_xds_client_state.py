"""Conformance of the sans-IO ADS client state machine (no I/O, no grpc): events in, actions out."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, duration_pb2

import planemesh.xds  # noqa: F401  (the real `xds` protos package before envoy imports)
from planemesh.agent.identity.ca import new_root, utcnow
from planemesh.model.config import ConfigError
from planemesh.xds.client_state import AdsClientState, ApplyConfig, Mode, SendRequest
from planemesh.xds.resources import CLUSTER, ENDPOINT, LISTENER, RESOURCE_WRAPPER, ROUTE, SECRET, pack
from planemesh.xds.sds import root_secret

NODE = base_pb2.Node(id="node-1", cluster="test")


def listener(name: str, route: str | None = None) -> listener_pb2.Listener:
    lsn = listener_pb2.Listener(name=name)
    lsn.address.socket_address.address = "0.0.0.0"
    lsn.address.socket_address.port_value = 80
    if route:
        hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name)
        hcm.rds.route_config_name = route
        chain = lsn.filter_chains.add()
        chain.filters.add(name="hcm").typed_config.CopyFrom(pack(hcm))
    return lsn


def cluster(name: str, eds: bool = False) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS if eds else cluster_pb2.Cluster.ORIGINAL_DST)
    return c


def cla(name: str) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name)


def route(name: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name)


def sotw(type_url: str, version: str, nonce: str, *msgs) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(
        type_url=type_url, version_info=version, nonce=nonce, resources=[pack(m) for m in msgs]
    )


def delta(type_url: str, nonce: str, *msgs, removed=(), ttl_s=None) -> discovery_pb2.DeltaDiscoveryResponse:
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, nonce=nonce, removed_resources=list(removed))
    for m in msgs:
        res = resp.resources.add(name=getattr(m, "name", "") or m.cluster_name, version=f"v-{nonce}")
        res.resource.CopyFrom(pack(m))
        if ttl_s:
            res.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl_s))
    return resp


def requests(actions, type_url=None):
    out = [a.request for a in actions if isinstance(a, SendRequest)]
    return [r for r in out if type_url is None or r.type_url == type_url]


def applies(actions) -> list[ApplyConfig]:
    return [a for a in actions if isinstance(a, ApplyConfig)]


def accept(state: AdsClientState, actions, now=0.0, error=None):
    """Play the consumer: apply every ApplyConfig (failing with `error`), return all resulting actions."""
    out = list(actions)
    for a in applies(actions):
        out += accept(state, state.apply_result(a.token, error, now), now, error)
    return out


def started(mode=Mode.SOTW, **kw) -> AdsClientState:
    st = AdsClientState(NODE, mode, **kw)
    st.stream_started(0.0)
    return st


# ---- SotW ------------------------------------------------------------------------------------------


def test_initial_requests_are_wildcard_lds_cds_with_node_once():
    st = AdsClientState(NODE, Mode.SOTW)
    reqs = requests(st.stream_started(0.0))
    assert [r.type_url for r in reqs] == [CLUSTER, LISTENER]  # clusters first; RDS/EDS only once named
    assert [list(r.resource_names) for r in reqs] == [[], []]
    assert reqs[0].node.id == "node-1" and not reqs[1].HasField("node")
    assert all(r.version_info == "" and r.response_nonce == "" for r in reqs)


def test_ack_only_after_apply():
    st = started()
    actions = st.response_received(sotw(CLUSTER, "1", "n1", cluster("c1")), 1.0)
    assert requests(actions) == []  # nothing ACKed before the consumer applied it
    [apply] = applies(actions)
    assert set(apply.resources.clusters) == {"c1"}
    [ack] = requests(st.apply_result(apply.token, None, 1.0))
    assert (ack.type_url, ack.version_info, ack.response_nonce) == (CLUSTER, "1", "n1")
    assert not ack.HasField("error_detail")


@pytest.mark.parametrize("mode", [Mode.SOTW, Mode.DELTA])
def test_nack_echoes_new_nonce_with_previous_version_and_keeps_old_resources(mode):
    st = started(mode)
    first = sotw(CLUSTER, "1", "n1", cluster("c1")) if mode is Mode.SOTW else delta(CLUSTER, "n1", cluster("c1"))
    accept(st, st.response_received(first, 0.0))
    second = sotw(CLUSTER, "2", "n2", cluster("c2")) if mode is Mode.SOTW else delta(CLUSTER, "n2", cluster("c2"))
    [apply] = applies(st.response_received(second, 1.0))
    [nack] = requests(st.apply_result(apply.token, ConfigError("cluster[c2].type", "bad cluster"), 1.0))
    assert nack.response_nonce == "n2"
    assert nack.error_detail.code == 3 and "cluster[c2]" in nack.error_detail.message
    if mode is Mode.SOTW:
        assert nack.version_info == "1"
    cds = st.types[CLUSTER]
    assert set(cds.cache) == {"c1"} and cds.nacks == 1 and cds.acks == 1
    assert cds.version == ("1" if mode is Mode.SOTW else "")


def test_every_decode_error_of_a_response_is_collected_into_one_nack():
    st = started()
    garbage = any_pb2.Any(type_url=CLUSTER, value=b"\xff\xff\xff")
    wrong = pack(listener("l1"))
    resp = discovery_pb2.DiscoveryResponse(
        type_url=CLUSTER,
        version_info="1",
        nonce="n1",
        resources=[pack(cluster("dup")), pack(cluster("dup")), garbage, wrong, pack(cluster(""))],
    )
    actions = st.response_received(resp, 0.0)
    assert applies(actions) == []
    [nack] = requests(actions)
    msg = nack.error_detail.message
    assert "'dup': duplicate name" in msg and "[2]: cannot decode" in msg and "Listener" in msg and "no name" in msg
    assert nack.version_info == "" and nack.response_nonce == "n1"


@pytest.mark.parametrize("type_url", ["type.googleapis.com/envoy.config.bogus.v3.Thing", ""])
def test_unknown_type_url_is_ignored_as_envoy_does(type_url):
    """Envoy ignores a response for a type URL nobody subscribed to: no ACK, no NACK, nothing changes."""
    st = started()
    assert st.response_received(sotw(type_url, "1", "n9"), 0.0) == []
    assert st.ignored_responses == 1 and "type URL" in (st.last_error or "")
    assert all(not t.cache and t.nacks == 0 for t in st.types.values())
    # the types it does follow are unaffected
    [apply] = applies(st.response_received(sotw(CLUSTER, "1", "n10", cluster("c1")), 1.0))
    [ack] = requests(st.apply_result(apply.token, None, 1.0))
    assert ack.response_nonce == "n10" and not ack.HasField("error_detail")


def test_sotw_listener_absent_from_response_is_deleted():
    st = started()
    accept(st, st.response_received(sotw(LISTENER, "1", "a", listener("l1"), listener("l2")), 0.0))
    [apply] = applies(st.response_received(sotw(LISTENER, "2", "b", listener("l2")), 1.0))
    assert set(apply.resources.listeners) == {"l2"}
    st.apply_result(apply.token, None, 1.0)
    assert set(st.types[LISTENER].cache) == {"l2"}


def test_rds_follows_listeners_and_warms_before_apply():
    st = started()
    actions = st.response_received(sotw(LISTENER, "1", "a", listener("l1", route="r1")), 0.0)
    [rds_req] = requests(actions, ROUTE)
    assert list(rds_req.resource_names) == ["r1"] and rds_req.version_info == ""
    assert applies(actions) == []  # warming: the listener waits for its route
    [apply] = applies(st.response_received(sotw(ROUTE, "1", "b", route("r1"), route("unasked")), 1.0))
    assert set(apply.resources.routes) == {"r1"} and set(apply.resources.listeners) == {"l1"}
    acks = requests(st.apply_result(apply.token, None, 1.0))
    assert {(r.type_url, r.version_info, r.response_nonce) for r in acks} == {(LISTENER, "1", "a"), (ROUTE, "1", "b")}
    # The listener switches to r2: RDS follows, r1 is dropped once the new listener is applied.
    actions = st.response_received(sotw(LISTENER, "2", "c", listener("l1", route="r2")), 2.0)
    [rds_req] = requests(actions, ROUTE)
    assert sorted(rds_req.resource_names) == ["r1", "r2"] and rds_req.response_nonce == "b"
    actions = accept(st, st.response_received(sotw(ROUTE, "2", "d", route("r2")), 3.0))
    [ack] = requests(actions, ROUTE)  # the ACK itself carries the shrunk subscription
    assert (list(ack.resource_names), ack.version_info, ack.response_nonce) == (["r2"], "2", "d")
    assert set(st.types[ROUTE].cache) == {"r2"} and st.types[ROUTE].names == {"r2"}


def test_eds_follows_clusters_and_sotw_eds_absence_is_not_deletion():
    st = started()
    actions = st.response_received(sotw(CLUSTER, "1", "a", cluster("c1", eds=True), cluster("c2", eds=True)), 0.0)
    assert [sorted(r.resource_names) for r in requests(actions, ENDPOINT)] == [["c1", "c2"]]
    assert applies(actions) == []
    assert applies(st.response_received(sotw(ENDPOINT, "1", "b", cla("c1")), 0.5)) == []  # c2 still missing
    [apply] = applies(st.response_received(sotw(ENDPOINT, "2", "c", cla("c2")), 1.0))
    assert set(apply.resources.endpoints) == {"c1", "c2"}  # c1 kept though absent from the last response
    st.apply_result(apply.token, None, 1.0)


def test_sotw_response_that_crossed_a_subscription_change_gets_the_names_again():
    # The server pushed CDS v2 and EDS v2 together; our EDS subscription for the new cluster carried EDS v1's
    # nonce, arrived after EDS v2 was sent and was ignored as stale. EDS v2 lacks c2: without sending the names
    # again with v2's nonce the update waited out initial_fetch_timeout_s (bench/scale.py: 15 s).
    st = started()
    accept(st, st.response_received(sotw(CLUSTER, "1", "a", cluster("c1", eds=True)), 0.0))
    accept(st, st.response_received(sotw(ENDPOINT, "1", "b", cla("c1")), 0.0))
    actions = st.response_received(sotw(CLUSTER, "2", "c", cluster("c1", eds=True), cluster("c2", eds=True)), 1.0)
    [sub] = requests(actions, ENDPOINT)
    assert (sorted(sub.resource_names), sub.response_nonce) == (["c1", "c2"], "b")
    actions = st.response_received(sotw(ENDPOINT, "2", "d", cla("c1")), 1.0)  # built before it read `sub`
    [again] = requests(actions)
    assert (again.type_url, sorted(again.resource_names), again.response_nonce) == (ENDPOINT, ["c1", "c2"], "d")
    assert again.version_info == "1" and not again.HasField("error_detail")  # not an ACK of v2: not applied yet
    assert applies(actions) == []  # still warming for c2
    [apply] = applies(st.response_received(sotw(ENDPOINT, "2", "e", cla("c1"), cla("c2")), 1.1))
    assert set(apply.resources.endpoints) == {"c1", "c2"}
    # A later response without the missing names, after it was sent again with the current nonce: no repeat.
    assert requests(st.response_received(sotw(ENDPOINT, "2", "e", cla("c1"), cla("c2")), 1.2), ENDPOINT) == []


def test_warming_gives_up_after_initial_fetch_timeout():
    st = started(initial_fetch_timeout_s=5.0)
    assert applies(st.response_received(sotw(LISTENER, "1", "a", listener("l1", route="missing")), 0.0)) == []
    assert st.next_deadline() == 5.0
    assert applies(st.timer_fired(4.9)) == []
    [apply] = applies(st.timer_fired(5.0))
    assert set(apply.resources.listeners) == {"l1"} and not apply.resources.routes  # translation will NACK it


def test_restart_resubscribes_with_acked_version_and_fresh_nonce():
    st = started()
    accept(st, st.response_received(sotw(LISTENER, "7", "a", listener("l1", route="r1")), 0.0))
    accept(st, st.response_received(sotw(ROUTE, "3", "b", route("r1")), 0.0))
    accept(st, st.response_received(sotw(CLUSTER, "5", "c", cluster("c1")), 0.0))
    st.stream_reset(1.0)
    assert not st.connected
    reqs = {r.type_url: r for r in requests(st.stream_started(2.0))}
    assert {t: (r.version_info, r.response_nonce) for t, r in reqs.items()} == {
        CLUSTER: ("5", ""),
        LISTENER: ("7", ""),
        ROUTE: ("3", ""),
    }
    assert list(reqs[ROUTE].resource_names) == ["r1"] and ENDPOINT not in reqs


def test_apply_outstanding_across_reset_commits_without_ack():
    st = started()
    [apply] = applies(st.response_received(sotw(CLUSTER, "1", "a", cluster("c1")), 0.0))
    st.stream_reset(0.5)
    assert requests(st.apply_result(apply.token, None, 1.0)) == []  # that stream is gone
    assert st.types[CLUSTER].version == "1"
    [req] = requests(st.stream_started(2.0), CLUSTER)
    assert req.version_info == "1"


def test_stale_response_is_not_acked_when_a_newer_one_is_pending():
    st = started()
    [first] = applies(st.response_received(sotw(CLUSTER, "1", "a", cluster("c1")), 0.0))
    assert st.response_received(sotw(CLUSTER, "2", "b", cluster("c2")), 0.1) == []  # waits for the apply
    actions = st.apply_result(first.token, None, 0.2)
    assert requests(actions) == []  # nonce "a" is stale: only "b" gets an answer
    [second] = applies(actions)
    [ack] = requests(st.apply_result(second.token, None, 0.3))
    assert (ack.version_info, ack.response_nonce) == ("2", "b")


def test_sotw_ttl_heartbeat_refreshes_and_expiry_removes():
    st = started()
    wrapped = discovery_pb2.Resource(name="c1", resource=pack(cluster("c1")), ttl=duration_pb2.Duration(seconds=10))
    resp = discovery_pb2.DiscoveryResponse(type_url=CLUSTER, version_info="1", nonce="a")
    resp.resources.add().Pack(wrapped)
    assert resp.resources[0].type_url == RESOURCE_WRAPPER
    accept(st, st.response_received(resp, 0.0))
    assert st.next_deadline() == 10.0
    heartbeat = discovery_pb2.Resource(name="c1", ttl=duration_pb2.Duration(seconds=10))
    resp = discovery_pb2.DiscoveryResponse(type_url=CLUSTER, version_info="1", nonce="b")
    resp.resources.add().Pack(heartbeat)
    accept(st, st.response_received(resp, 8.0))
    assert set(st.types[CLUSTER].cache) == {"c1"} and st.next_deadline() == 18.0
    assert applies(st.timer_fired(17.0)) == []
    [apply] = applies(st.timer_fired(18.0))
    assert apply.resources.clusters == {}
    assert requests(st.apply_result(apply.token, None, 18.0)) == []  # a local change: nothing to ACK
    assert st.types[CLUSTER].cache == {} and st.next_deadline() is None


# ---- Delta -----------------------------------------------------------------------------------------


def test_delta_initial_requests_subscribe_wildcard():
    st = AdsClientState(NODE, Mode.DELTA)
    reqs = requests(st.stream_started(0.0))
    assert [(r.type_url, list(r.resource_names_subscribe)) for r in reqs] == [(CLUSTER, ["*"]), (LISTENER, ["*"])]
    assert all(isinstance(r, discovery_pb2.DeltaDiscoveryRequest) for r in reqs)


def test_delta_updates_merge_and_removed_resources_delete():
    st = started(Mode.DELTA)
    accept(st, st.response_received(delta(CLUSTER, "a", cluster("c1"), cluster("c2")), 0.0))
    [apply] = applies(st.response_received(delta(CLUSTER, "b", cluster("c3"), removed=["c1"]), 1.0))
    assert set(apply.resources.clusters) == {"c2", "c3"}
    [ack] = requests(st.apply_result(apply.token, None, 1.0))
    assert ack.response_nonce == "b" and not ack.HasField("error_detail")


def test_delta_subscribe_and_unsubscribe_follow_parents():
    st = started(Mode.DELTA)
    actions = accept(st, st.response_received(delta(LISTENER, "a", listener("l1", route="r1")), 0.0))
    [sub] = requests(actions, ROUTE)
    assert list(sub.resource_names_subscribe) == ["r1"] and list(sub.resource_names_unsubscribe) == []
    accept(st, st.response_received(delta(ROUTE, "b", route("r1")), 0.0))
    actions = accept(st, st.response_received(delta(LISTENER, "c", listener("l1")), 1.0))  # no route any more
    unsub = [r for r in requests(actions, ROUTE) if r.resource_names_unsubscribe]
    assert [list(r.resource_names_unsubscribe) for r in unsub] == [["r1"]]
    assert st.types[ROUTE].cache == {}


def test_delta_reconnect_sends_initial_resource_versions():
    st = started(Mode.DELTA)
    accept(st, st.response_received(delta(CLUSTER, "a", cluster("c1"), cluster("c2")), 0.0))
    accept(st, st.response_received(delta(LISTENER, "b", listener("l1", route="r1")), 0.0))
    accept(st, st.response_received(delta(ROUTE, "c", route("r1")), 0.0))
    st.stream_reset(1.0)
    reqs = {r.type_url: r for r in requests(st.stream_started(2.0))}
    assert dict(reqs[CLUSTER].initial_resource_versions) == {"c1": "v-a", "c2": "v-a"}
    assert dict(reqs[ROUTE].initial_resource_versions) == {"r1": "v-c"}
    assert list(reqs[ROUTE].resource_names_subscribe) == ["r1"]
    assert all(r.response_nonce == "" for r in reqs.values())


def test_delta_ttl_expiry_removes_resource():
    st = started(Mode.DELTA)
    accept(st, st.response_received(delta(CLUSTER, "a", cluster("c1"), ttl_s=3), 0.0))
    [apply] = applies(st.timer_fired(3.0))
    assert apply.resources.clusters == {}


def test_wrong_protocol_flavour_is_ignored():
    st = started(Mode.DELTA)
    assert st.response_received(sotw(CLUSTER, "1", "a", cluster("c1")), 0.0) == []
    assert "SotW response" in (st.last_error or "") and st.types[CLUSTER].cache == {}


def test_a_strict_planes_secrets_are_subscribed_and_awaited_without_a_listener_naming_them():
    """A plane whose SLA requires mTLS terminates with its `mtls_cert`/`mtls_trust` Secrets on ports no listener
    gives TLS (agent/proxy/tls.py plane_tcp_chains): the client asks for them from the start, and an update
    warms until they arrive (before, nothing subscribed them and every update was refused)."""
    st = AdsClientState(NODE, Mode.SOTW, pinned_secrets=frozenset({"ROOTCA"}))
    reqs = requests(st.stream_started(0.0), SECRET)
    assert [sorted(r.resource_names) for r in reqs] == [["ROOTCA"]]
    assert applies(st.response_received(sotw(LISTENER, "1", "n1", listener("l1")), 1.0)) == []  # warming
    roots = root_secret(new_root("cluster.local", now=utcnow()).root_pem())
    [apply] = applies(st.response_received(sotw(SECRET, "1", "s1", roots), 1.5))
    assert set(apply.resources.secrets) == {"ROOTCA"} and set(apply.resources.listeners) == {"l1"}
