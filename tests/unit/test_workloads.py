"""One node, many workloads: pod discovery parsing, the bootstrap section, and the merge that scopes each
workload's configuration to its own traffic (outbound by source, inbound by destination)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
from google.protobuf import any_pb2

from planemesh.agent.proxy import pipeline
from planemesh.agent.proxy.routing import PlaneRouter
from planemesh.agent.proxy.routing_table import RoutingTable
from planemesh.agent.proxy.sni_routing import SniRoutes
from planemesh.agent.rbac import RbacFilter
from planemesh.agent.workloads.discovery import (
    NETWORK_STATUS,
    network_status_addresses,
    workloads_from_file_dict,
    workloads_from_pod_list,
)
from planemesh.agent.workloads.merge import merge, reconcile, scope
from planemesh.agent.workloads.model import Workload, WorkloadError, WorkloadSet
from planemesh.agent.workloads.settings import settings_from_dict
from planemesh.agent.workloads.sharing import MAX_VARIANTS, SharedDecoder
from planemesh.agent.workloads.streams import WorkloadStreams
from planemesh.ebpf.abi import Action
from planemesh.ebpf.policy import PolicyRule, SourceRule, fold_source_rules, policy_from_snapshot
from planemesh.labs.envoy_resources import HCM, PASSTHROUGH, ROUTER, T, by_type, http_listener, route, route_config
from planemesh.model.config import (
    Cluster,
    ConfigError,
    Listener,
    ListenerProtocol,
    Route,
    RouteAction,
    RouteConfig,
    Snapshot,
    VirtualHost,
    WeightedCluster,
)
from planemesh.model.ip import IPNetwork
from planemesh.model.static_config import load_default_config
from planemesh.model.validation import validate_snapshot
from planemesh.xds.client_state import XdsResources
from planemesh.xds.per_resource import translate_update
from planemesh.xds.resources import CLUSTER, LISTENER, ROUTE, ResourceError, Wrapped, resource_name

PLANES = load_default_config().planes  # oam 198.18.1.0/24 + fd00:18:1::/64, media 198.18.2.0/24 + ...


def _pod(name: str, ips: list[str], *, node: str = "n1", phase: str = "Running", **extra) -> dict:
    pod = {
        "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}", "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": f"sa-{name}"},
        "status": {"phase": phase, "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]},
    }
    for key, value in extra.items():
        section, field = key.split("__")
        pod[section][field] = value
    return pod


def test_pod_list_with_multus_network_status() -> None:
    status = json.dumps([
        {"name": "cbr0", "interface": "eth0", "ips": ["198.18.1.10"], "default": True},
        {"name": "default/media", "interface": "net1", "ips": ["198.18.2.10", "fd00:18:2::10"]},
    ])  # fmt: skip
    pods = {"items": [
        _pod("a", ["198.18.1.10"], metadata__annotations={NETWORK_STATUS: status}),
        _pod("elsewhere", ["198.18.1.11"], node="n2"),
        _pod("pending", ["198.18.1.12"], phase="Pending"),
        _pod("hostnet", ["198.18.1.13"], spec__hostNetwork=True),
        _pod("optout", ["198.18.1.14"], metadata__annotations={"planemesh.io/workload": "false"}),
        _pod("sidecar", ["198.18.1.16"], spec__containers=[{"name": "app"}, {"name": "istio-proxy"}]),
        _pod("native", ["198.18.1.17"], spec__initContainers=[{"name": "istio-proxy", "restartPolicy": "Always"}]),
        _pod("gone", ["198.18.1.15"], metadata__deletionTimestamp="2026-12-06T00:00:00Z"),
        _pod("offplane", ["10.244.0.5"]),
        {"metadata": {"name": "Bad_Name"}},
    ]}  # fmt: skip
    found, errors = workloads_from_pod_list(pods, PLANES, "n1")
    assert list(found.workloads) == ["a.default"]
    a = found.workloads["a.default"]
    assert a.addresses == ("198.18.1.10", "198.18.2.10", "fd00:18:2::10")
    assert a.service_account == "sa-a" and dict(a.labels) == {"app": "a"}
    assert len(errors) == 1 and "items[9]" in errors[0] and "Bad_Name" in errors[0]
    with pytest.raises(WorkloadError, match="PodList"):
        workloads_from_pod_list({"kind": "Status"}, PLANES, "n1")


@pytest.mark.parametrize("text", [None, "", "not json", "{}", '[{"ips": "1.2.3.4"}]', '[1, "x"]'])
def test_malformed_network_status_is_no_address(text) -> None:
    assert network_status_addresses(text) == []


def test_node_identity_is_istio_agents() -> None:
    w = Workload("reviews-v1", "bookinfo", ("198.18.1.10", "198.18.2.10"), (("app", "reviews"),), "reviews")
    assert w.node_id() == "sidecar~198.18.1.10~reviews-v1.bookinfo~bookinfo.svc.cluster.local"
    meta = w.node_metadata("1.24.0", "Kubernetes")
    assert meta["INSTANCE_IPS"] == "198.18.1.10,198.18.2.10" and meta["INTERCEPTION_MODE"] == "TPROXY"
    assert meta["LABELS"] == {"app": "reviews"} and meta["NAMESPACE"] == "bookinfo"
    assert meta["SERVICE_ACCOUNT"] == "reviews" and meta["CLUSTER_ID"] == "Kubernetes"


def test_workloads_file_and_its_errors() -> None:
    found = workloads_from_file_dict(
        {"workloads": [{"name": "a", "addresses": ["198.18.1.10", "10.0.0.1"], "labels": {"app": "a"}}]}, PLANES
    )
    assert found.workloads["a.default"].addresses == ("198.18.1.10",)
    for bad, where in [
        ({"workloads": [{"name": "a"}]}, "workloads[0].addresses"),
        ({"workloads": [{"name": "a", "addresses": ["x"]}]}, "workloads[0].addresses[0]"),
        ({"workloads": [{"name": "a", "addresses": ["10.0.0.1"]}]}, "workloads[0].addresses"),
        ({"workloads": [{"name": "A", "addresses": ["198.18.1.1"]}]}, "workloads[0].name"),
        ({"workloads": [{"name": "a", "addresses": ["198.18.1.1"], "port": 1}]}, "workloads[0].port"),
        ({"workloads": [{"name": "a", "addresses": ["198.18.1.1"]}] * 2}, "workloads[1].name"),
        ({"pods": []}, "workloads file"),
    ]:
        with pytest.raises(WorkloadError) as info:
            workloads_from_file_dict(bad, PLANES)
        assert info.value.path == where, info.value


def test_diff_restarts_a_changed_workload() -> None:
    a, b = Workload("a", "d", ("198.18.1.10",)), Workload("b", "d", ("198.18.1.11",))
    b2 = Workload("b", "d", ("198.18.1.11",), uid="new")
    started, stopped = WorkloadSet({"a.d": a, "b.d": b}).diff(WorkloadSet({"b.d": b2}))
    assert started == [b2] and stopped == [a, b]


def test_settings() -> None:
    s = settings_from_dict({"source": "kubernetes"}, {"KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                                     "PLANEMESH_NODE_ID": "n1"})  # fmt: skip
    assert s.kubernetes is not None and s.kubernetes.api == "https://10.96.0.1:443" and s.node_name == "n1"
    for raw, env, where in [
        ({"source": "kubelet"}, {}, "workloads.source"),
        ({"source": "file"}, {}, "workloads.file"),
        ({"source": "kubernetes"}, {"PLANEMESH_NODE_ID": "n1"}, "workloads.kubernetes.api"),
        ({"source": "kubernetes", "kubernetes": {"api": "https://k"}}, {}, "workloads.node_name"),
        ({"source": "kubernetes", "kubernetes": {"api": "http://k:80"}}, {"PLANEMESH_NODE_ID": "n"},
         "workloads.kubernetes.api"),
        ({"source": "file", "file": "/f", "poll_interval_s": 0}, {}, "workloads.poll_interval_s"),
        ({"source": "file", "file": "/f", "extra": 1}, {}, "workloads.extra"),
        ({"source": "file", "file": "/f", "istiod_tokens": {}}, {}, "workloads.istiod_tokens"),
        ({"source": "kubernetes", "node_name": "n", "kubernetes": {"api": "https://k"},
          "istiod_tokens": {"expiration_s": 60}}, {}, "workloads.istiod_tokens.expiration_s"),
        ({"source": "kubernetes", "node_name": "n", "kubernetes": {"api": "https://k"},
          "istiod_tokens": {"dir": "tokens"}}, {}, "workloads.istiod_tokens.dir"),
        ({"source": "kubernetes", "node_name": "n", "kubernetes": {"api": "https://k"},
          "istiod_tokens": {"who": 1}}, {}, "workloads.istiod_tokens"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as info:
            settings_from_dict(raw, env)
        assert info.value.path == where


# ---- merge: each workload's configuration on its own traffic ------------------------------------------


def _snap(cluster: str, inbound_cluster: str = "inb") -> Snapshot:
    """One workload's configuration: outbound port 80 routed to `cluster`, an inbound chain on port 8080."""
    routes = {
        "80": RouteConfig("80", (VirtualHost("any", routes=(Route(action=RouteAction(cluster=cluster)),)),)),
        "in": RouteConfig("in", (VirtualHost("any", routes=(Route(action=RouteAction(cluster=inbound_cluster)),)),)),
    }
    clusters = {n: Cluster(n) for n in {cluster, inbound_cluster, "v1", "v2"}}
    listeners = (
        Listener("0.0.0.0_80", "oam", 80, ListenerProtocol.HTTP, route_config="80"),
        Listener("0.0.0.0_80@media", "media", 80, ListenerProtocol.HTTP, route_config="80"),
        Listener("virtualInbound/0.0.0.0_8080", "oam", 8080, ListenerProtocol.HTTP, route_config="in"),
    )
    return Snapshot("xds:LDS=1,CDS=1", PLANES, listeners, routes, clusters)


A = Workload("a", "default", ("198.18.1.10", "198.18.2.10"))
B = Workload("b", "default", ("198.18.1.11",))


def _cluster_for(router: PlaneRouter, dst: str, port: int, src: str) -> str | None:
    crc = router.route_config(dst, port, src)
    if crc is None:
        return None
    return router.snapshot.routes[crc.name].virtual_hosts[0].routes[0].action.cluster


def test_outbound_by_source_inbound_by_destination() -> None:
    merged = merge(PLANES, {"a.default": (A, _snap("v1", "inb-a")), "b.default": (B, _snap("v2", "inb-b"))}, "m1")
    snap = merged.snapshot
    validate_snapshot(snap)
    router = PlaneRouter(snap, "oam")
    # the same service address, two clients: each gets its own route
    assert _cluster_for(router, "198.18.1.50", 80, "198.18.1.10") == "v1"
    assert _cluster_for(router, "198.18.1.50", 80, "198.18.1.11") == "v2"
    assert _cluster_for(router, "198.18.1.50", 80, "198.18.1.99") is None  # not a local workload: no listener
    # inbound: chosen by the destination pod, whoever the (remote) client is
    assert _cluster_for(router, "198.18.1.10", 8080, "198.18.1.99") == "inb-a"
    assert _cluster_for(router, "198.18.1.11", 8080, "198.18.1.99") == "inb-b"
    assert _cluster_for(router, "198.18.1.12", 8080, "198.18.1.99") is None
    # a local client to a local pod: the client's outbound routing wins (one proxy hop, as for one sidecar)
    assert _cluster_for(router, "198.18.1.11", 80, "198.18.1.10") == "v1"
    # b has no media address: none of its listeners is on media
    assert [lsn.name for lsn in snap.listeners_of("media")] == ["0.0.0.0_80@media~a.default"]


def test_identical_resources_are_one_object_and_variants_are_renamed() -> None:
    same = _snap("v1")
    views = {f"w{i}.default": (Workload(f"w{i}", "default", (f"198.18.1.{20 + i}",)), same) for i in range(50)}
    merged = merge(PLANES, views, "m")
    assert len(merged.snapshot.routes) == 2 and len(merged.snapshot.clusters) == 3  # not 50x
    assert (
        len(merged.snapshot.listeners) == 100
    )  # two oam ones per workload (none has a media address), each scoped to it
    diverse = merge(PLANES, {"a.default": (A, _snap("v1")), "b.default": (B, _snap("v2"))}, "m")
    names = sorted(diverse.snapshot.routes)
    assert len(names) == 3 and "in" in names and all(n.startswith("80@") for n in names if n != "in")
    validate_snapshot(diverse.snapshot)


def test_a_renamed_cluster_is_renamed_in_the_routes_that_name_it() -> None:
    a, b = _snap("v1"), _snap("v1")
    b = Snapshot(b.version, b.planes, b.listeners, b.routes, {**b.clusters, "v1": Cluster("v1", connect_timeout_s=3)})
    snap = merge(PLANES, {"a.default": (A, a), "b.default": (B, b)}, "m").snapshot
    validate_snapshot(snap)  # every reference resolves
    router = PlaneRouter(snap, "oam")
    ca, cb = _cluster_for(router, "198.18.1.50", 80, "198.18.1.10"), _cluster_for(router, "198.18.1.50", 80,
                                                                                   "198.18.1.11")  # fmt: skip
    assert ca != cb and ca.startswith("v1@") and cb.startswith("v1@")
    assert snap.clusters[cb].connect_timeout_s == 3 and snap.clusters[ca].connect_timeout_s is None


def test_http_and_tcp_of_two_pods_on_one_destination_each_keep_their_own() -> None:
    """a proxies HTTP on port 80, b's sidecar would pass its port 80 through (tcp_proxy): the kernel decides per
    source address (b's stays a bypass, in the kernel); nothing is sniffed or dropped."""
    tcp = Snapshot("x", PLANES, (Listener("0.0.0.0_80", "oam", 80, ListenerProtocol.TCP),))
    merged = merge(PLANES, {"a.default": (A, _snap("v1")), "b.default": (B, tcp)}, "m")
    snap = merged.snapshot
    validate_snapshot(snap)
    port80 = [lsn for lsn in snap.listeners if lsn.port == 80 and lsn.plane == "oam"]
    assert [(lsn.protocol, lsn.sniff) for lsn in port80] == [
        (ListenerProtocol.HTTP, False),
        (ListenerProtocol.TCP, False),
    ]
    assert not merged.notes
    policy = policy_from_snapshot(snap)
    oam = snap.plane("oam").plane_id
    assert policy.source_rules[SourceRule("198.18.1.10", PolicyRule(oam, 80))] is Action.PROXY
    assert policy.source_rules[SourceRule("198.18.1.11", PolicyRule(oam, 80))] is Action.BYPASS
    assert PolicyRule(oam, 80) not in policy.rules  # other sources: the plane's undeclared action


def test_http_and_tcp_claiming_one_unscoped_key_are_reconciled() -> None:
    http = Listener("virtualInbound/a", "oam", 80, ListenerProtocol.HTTP, prefixes=(IPNetwork("198.18.1.10/32"),))
    tcp = dataclasses.replace(http, name="virtualInbound/b", protocol=ListenerProtocol.TCP)
    kept, notes = reconcile([http, tcp])
    assert [(lsn.name, lsn.sniff) for lsn in kept] == [("virtualInbound/a", True)] and len(notes) == 2


def test_a_source_scoped_listener_needs_its_source() -> None:
    lsn = Listener("x", "oam", 80, ListenerProtocol.HTTP, sources=(IPNetwork("198.18.1.10/32"),))
    snap = Snapshot("s", PLANES, (lsn,))
    router = PlaneRouter(snap, "oam")
    assert router.route_config("198.18.1.50", 80, "198.18.1.10") is not None
    assert router.route_config("198.18.1.50", 80, "::ffff:198.18.1.10") is not None
    assert router.route_config("198.18.1.50", 80, "198.18.1.11") is None
    assert router.route_config("198.18.1.50", 80) is None


def test_shared_decoder_decodes_each_content_once_and_keeps_few_per_name() -> None:
    calls: list[bytes] = []

    def decode(raw, type_url: str) -> Wrapped:
        calls.append(raw.value)
        if raw.value == b"bad":
            raise ResourceError(type_url, "cannot decode")
        return Wrapped("same-name", object())

    shared = SharedDecoder()
    raw = any_pb2.Any(type_url="t", value=b"v1")
    first = shared("t", raw, decode)
    assert shared("t", any_pb2.Any(type_url="t", value=b"v1"), decode) is first and calls == [b"v1"]
    for _ in range(2):  # a bad resource is never kept: decoded (and refused) each time
        with pytest.raises(ResourceError):
            shared("t", any_pb2.Any(type_url="t", value=b"bad"), decode)
    for i in range(2, 2 + MAX_VARIANTS):
        shared("t", any_pb2.Any(type_url="t", value=b"v%d" % i), decode)
    assert shared.entries() == MAX_VARIANTS  # the oldest content of the name went
    assert shared("t", raw, decode) is not first and calls[-1] == b"v1"


def test_node_version_changes_with_a_workloads_addresses() -> None:
    snap = _snap("v1")
    before = WorkloadStreams._version({"a.default": (A, snap)})
    moved = Workload("a", "default", ("198.18.1.42",))
    assert WorkloadStreams._version({"a.default": (moved, snap)}) != before  # same xDS versions, new addresses
    assert WorkloadStreams._version({"a.default": (A, snap)}) == before


def test_local_to_local_applies_the_servers_inbound_filters_too() -> None:
    """A local client to a local server: the client's listener and routes, then at the request's endpoint the
    server's inbound HTTP filters (its AuthorizationPolicy's RBAC), as the two sidecars would apply them in
    turn (pipeline.local_inbound, tests/unit/test_local_inbound.py); a remote client gets the server's chain."""
    deny = RbacFilter("deny")
    server = Snapshot("xds:LDS=1,CDS=1", PLANES, (
        Listener("virtualInbound/0.0.0.0_80", "oam", 80, ListenerProtocol.HTTP, route_config="in",
                 http_filters=(deny,)),
    ), {"in": RouteConfig("in", (VirtualHost("any", routes=(Route(action=RouteAction(cluster="inb")),)),))},
        {"inb": Cluster("inb")})  # fmt: skip
    snap = merge(PLANES, {"a.default": (A, _snap("v1")), "b.default": (B, server)}, "m").snapshot
    validate_snapshot(snap)
    table = RoutingTable(snap, "oam")
    router = table.router
    own = router.route_config("198.18.1.11", 80, "198.18.1.10")  # a -> b, both local: a's own listener
    assert _cluster_for(router, "198.18.1.11", 80, "198.18.1.10") == "v1" and own is not None  # a's routing
    assert router.local_inbound(own, "198.18.1.11", 80) is not None  # ... then b's inbound stage at b
    first = router.route_request(own, "b", b"/p", dict)
    views: list = []
    proxy = SimpleNamespace(table=table, stats=SimpleNamespace(rate_limited=0, overloaded=0), clock=lambda: 0.0)
    refused = pipeline.local_inbound(proxy, own, ("198.18.1.11", 80), first, "b", b"/p", dict,  # type: ignore[arg-type]
                                     lambda rbac, view: views.append((rbac, view)) or "denied")  # fmt: skip
    assert type(refused) is pipeline.Local and refused.status == 403
    assert views[0][0] == (deny,) and views[0][1].local == ("198.18.1.11", 80) and views[0][1].target == "/p"
    remote = router.route_config("198.18.1.11", 80, "198.18.1.99")
    assert remote is not None and remote.filter_chain(lambda: 0.0).rbac == (deny,)  # b's own chain
    assert router.local_inbound(remote, "198.18.1.11", 80) is None  # no second stage for a remote client
    elsewhere = router.route_config("198.18.1.50", 80, "198.18.1.10")  # a -> not a local pod: a's only
    assert elsewhere is own and router.local_inbound(own, "198.18.1.50", 80) is None


def test_a_pods_inbound_and_outbound_listeners_of_one_port_do_not_collide() -> None:
    """istiod gives a pod that serves port 8081 and calls a service on 8081 an inbound chain and an outbound
    listener of that port; scoped to the pod (inbound by destination, outbound by source) they are two
    listeners, where one proxy for the node had to refuse one of them."""
    docs = [http_listener("0.0.0.0_8081", 8081, routes="8081"), route_config([route(cluster="v1")], name="8081"),
            {**PASSTHROUGH, "name": "v1"}, {**PASSTHROUGH, "name": "inbound|8081||"},
            _virtual_inbound_doc(8081)]  # fmt: skip
    named = {t: {resource_name(m): m for m in ms} for t, ms in by_type(docs).items()}
    res = XdsResources(named[LISTENER], named[ROUTE], named[CLUSTER], {}, {"LDS": "1", "CDS": "1"})
    # the node's one stream: per-resource application, like the whole push, no longer NACKs the pair
    assert translate_update(res, PLANES).rejected == {}
    pod = Workload("p", "default", ("198.18.1.10",))
    result = translate_update(res, PLANES, scope=lambda lsn: scope(lsn, pod, PLANES))
    assert result.rejected == {}
    snap = merge(PLANES, {pod.key: (pod, result.snapshot)}, "m").snapshot
    validate_snapshot(snap)
    router = PlaneRouter(snap, "oam")
    assert _cluster_for(router, "198.18.1.50", 8081, "198.18.1.10") == "v1"  # its outbound
    assert _cluster_for(router, "198.18.1.10", 8081, "198.18.1.99") == "inbound|8081||"  # its inbound


def _virtual_inbound_doc(port: int) -> dict:
    rc = {"name": f"inbound|{port}", "virtual_hosts": [{"name": "inbound", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "route": {"cluster": f"inbound|{port}||"}}]}]}  # fmt: skip
    hcm = {"@type": HCM, "stat_prefix": "inbound", "route_config": rc, "http_filters": [ROUTER]}
    return {"@type": T + "envoy.config.listener.v3.Listener", "name": "virtualInbound",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},
            "listener_filters": [{"name": "envoy.filters.listener.original_dst", "typed_config": {
                "@type": T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}],
            "filter_chains": [{"name": f"0.0.0.0_{port}", "filter_chain_match": {"destination_port": port},
                               "filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}  # fmt: skip


def test_tcp_chains_are_selected_by_source_then_node_wide() -> None:
    """The sniffing listener's chain choice (agent/proxy/sni_routing.py) for merged TCP chains: a pod's own chain
    for its connections, the node-wide one for others; a more specific destination (a server's inbound chain)
    still wins over a client's catch-all, as in Envoy's filter_chain_match."""
    own = Listener("0.0.0.0_9400~b", "oam", 9400, ListenerProtocol.TCP, tcp_clusters=(WeightedCluster("v2", 1),),
                   sources=(IPNetwork("198.18.1.11/32"),))  # fmt: skip
    node = Listener("0.0.0.0_9400", "oam", 9400, ListenerProtocol.TCP, tcp_clusters=(WeightedCluster("v1", 1),))
    inbound = Listener("virtualInbound/9400", "oam", 9400, ListenerProtocol.TCP,
                       prefixes=(IPNetwork("198.18.1.12/32"),), tcp_clusters=(WeightedCluster("in", 1),))  # fmt: skip
    routes = SniRoutes([own, node, inbound])

    def cluster(dst: str, src: str | None) -> str | None:
        chain = routes.select(9400, dst, None, src=src)
        return chain.action.cluster if chain and chain.action else None

    assert cluster("198.18.1.50", "198.18.1.11") == "v2"
    assert cluster("198.18.1.50", "::ffff:198.18.1.11") == "v2"
    assert cluster("198.18.1.50", "198.18.1.10") == "v1"
    assert cluster("198.18.1.50", None) == "v1"
    assert cluster("198.18.1.12", "198.18.1.11") == "in"
    assert routes.declares(9400, "198.18.1.10") and SniRoutes([own]).declares(9400, "198.18.1.11")
    assert not SniRoutes([own]).declares(9400, "198.18.1.10")  # another pod's chain does not own the port for it


def test_source_rules_fold_the_node_rules_of_their_port() -> None:
    oam = 1
    own = {SourceRule("198.18.1.11", PolicyRule(oam, 9400)): Action.SNIFF}
    node = {PolicyRule(oam, 9400, "198.18.1.12/32"): Action.PROXY, PolicyRule(oam, 9400): Action.BYPASS,
            PolicyRule(oam, 9400, "fd00:18:1::c/128"): Action.PROXY, PolicyRule(oam, 80): Action.PROXY}  # fmt: skip
    folded = fold_source_rules(own, node)
    assert folded == {
        SourceRule("198.18.1.11", PolicyRule(oam, 9400)): Action.SNIFF,  # its own wins at an equal prefix
        SourceRule("198.18.1.11", PolicyRule(oam, 9400, "198.18.1.12/32")): Action.PROXY,  # a longer one stays
    }
    with pytest.raises(ValueError, match="prefix"):
        SourceRule("198.18.1.0/24", PolicyRule(oam, 80))
    with pytest.raises(ValueError, match="families"):
        SourceRule("198.18.1.11", PolicyRule(oam, 80, "fd00::/64"))


def test_too_many_per_source_rules_are_refused_before_anything_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    import planemesh.ebpf.policy as policy_module

    monkeypatch.setattr(policy_module, "PM_MAX_SRC_POLICY", 3)
    listeners = tuple(
        Listener(f"l{i}", "oam", 9000 + i, ListenerProtocol.TCP, sources=(IPNetwork("198.18.1.10/32"),))
        for i in range(4)
    )
    with pytest.raises(ConfigError, match="4 per-source kernel rules, the data path holds 3"):
        policy_from_snapshot(Snapshot("s", PLANES, listeners))
