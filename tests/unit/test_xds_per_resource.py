"""Envoy's update semantics, pure: translate_update per resource, and the state machine's per-resource NACK.

No gRPC: resources are built from YAML as a control plane writes them; the ADS stream is a list of
responses fed to AdsClientState, whose ApplyConfig actions are answered by translate_update (the consumer
XdsClient is, without the socket).
"""

from __future__ import annotations

from types import MappingProxyType

import pytest
import yaml

from planemesh.model.config import ClusterKind
from planemesh.xds.client_state import AdsClientState, ApplyConfig, Mode, SendRequest, XdsResources
from planemesh.xds.per_resource import translate_update
from planemesh.xds.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, parse_resource_text, unpack
from planemesh.xds.translate import TranslationCache
from tests.unit.test_xds_client_state import NODE, delta, sotw
from tests.unit.test_xds_translate import (
    PASS,
    PLANES,
    T,
    http_listener,
    routes,
    static_cluster,
    tcp_listener,
    to_resources,
)

BAD_LISTENER = http_listener("bad", address="300.1.1.1", port=81)
BAD_ROUTE = routes("r_bad", direct_response={"status": 1000})


def msgs(*docs: dict) -> list:
    return [unpack(p, p.type_url) for p in parse_resource_text(yaml.safe_dump(list(docs)), "test")]


def eds_cluster(name="api") -> dict:
    return {
        "@type": T + "envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}}},
    }


def cla_doc(name="api", address="198.18.1.30", port=9000) -> dict:
    ep = {"endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}}}
    return {"@type": T + "envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name": name,
            "endpoints": [{"lb_endpoints": [ep]}]}  # fmt: skip


def _names(snap) -> dict[str, set[str]]:
    return {
        "listeners": {x.name.split("@")[0] for x in snap.listeners},
        "routes": set(snap.routes),
        "clusters": set(snap.clusters),
    }


# ---- translate_update: the table --------------------------------------------------------------------
# (id, update docs, previously accepted docs or None, expected names in the snapshot, expected rejected
#  {type: [names]}, expected warming listeners)
CASES = [
    (
        "bad-listener-never-blocks-a-cluster-or-a-listener",
        [BAD_LISTENER, http_listener("good"), PASS, static_cluster()],
        None,
        {"listeners": {"good"}, "routes": {"good_inline"}, "clusters": {"pass", "web"}},
        {LISTENER: ["bad"]},
        (),
    ),
    (
        "bad-route-config-never-blocks-the-others",
        [http_listener("l1", rds="r1"), routes("r1", route={"cluster": "pass"}), BAD_ROUTE, PASS],
        None,
        {"listeners": {"l1"}, "routes": {"r1"}, "clusters": {"pass"}},
        {ROUTE: ["r_bad"]},
        (),
    ),
    (
        "route-naming-a-missing-cluster-is-accepted",
        [http_listener("l1", rds="r1"), routes("r1", route={"cluster": "ghost"})],
        None,
        {"listeners": {"l1"}, "routes": {"r1"}, "clusters": set()},
        {},
        (),
    ),
    (
        "tcp-proxy-naming-a-missing-cluster-is-accepted",
        [tcp_listener(cluster="ghost")],
        None,
        {"listeners": {"t1"}, "routes": set(), "clusters": set()},
        {},
        (),
    ),
    (
        "listener-without-its-route-config-is-warming-not-rejected",
        [http_listener("l1", rds="r9"), PASS],
        None,
        {"listeners": set(), "routes": set(), "clusters": {"pass"}},
        {},
        ("l1",),
    ),
    (
        "warming-listener-keeps-its-previous-version",
        [http_listener("l1", rds="r9"), routes("r1", route={"cluster": "pass"}), PASS],
        [http_listener("l1", rds="r1"), routes("r1", route={"cluster": "pass"}), PASS],
        {"listeners": {"l1"}, "routes": {"r1"}, "clusters": {"pass"}},
        {},
        ("l1",),
    ),
    (
        "route-config-removed-while-named-keeps-serving",
        [http_listener("l1", rds="r1"), PASS],
        [http_listener("l1", rds="r1"), routes("r1", route={"cluster": "pass"}), PASS],
        {"listeners": {"l1"}, "routes": {"r1"}, "clusters": {"pass"}},
        {},
        (),
    ),
    (
        "rejected-cluster-keeps-its-previous-version",
        [static_cluster(port=0)],
        [static_cluster()],
        {"listeners": set(), "routes": set(), "clusters": {"web"}},
        {CLUSTER: ["web"]},
        (),
    ),
    (
        "rejected-new-listener-stays-absent-the-old-ones-stay",
        [http_listener("good"), BAD_LISTENER, PASS],
        [http_listener("good"), PASS],
        {"listeners": {"good"}, "routes": {"good_inline"}, "clusters": {"pass"}},
        {LISTENER: ["bad"]},
        (),
    ),
    (
        "eds-cluster-without-endpoints-is-active-with-none",
        [eds_cluster()],
        None,
        {"listeners": set(), "routes": set(), "clusters": {"api"}},
        {},
        (),
    ),
    (
        "bad-endpoints-are-the-eds-resource-s-fault",
        [eds_cluster(), cla_doc(address="web.example")],
        None,
        {"listeners": set(), "routes": set(), "clusters": {"api"}},  # active, without endpoints
        {ENDPOINT: ["api"]},
        (),
    ),
    (
        "port-clash-rejects-one-listener-the-other-serves",
        [tcp_listener("t1"), tcp_listener("t2"), PASS],
        None,
        {"listeners": {"t1"}, "routes": set(), "clusters": {"pass"}},
        {LISTENER: ["t2"]},
        (),
    ),
    (
        "sla-conflict-rejects-only-the-listener-that-made-it",
        [
            http_listener("a", meta={"plane": "oam", "sla": {"workers": 2}}),
            http_listener("b", port=81, meta={"plane": "oam", "sla": {"workers": 3}}),
            PASS,
        ],
        None,
        {"listeners": {"a"}, "routes": {"a_inline"}, "clusters": {"pass"}},
        {LISTENER: ["b"]},
        (),
    ),
]


@pytest.mark.parametrize(("docs", "before", "names", "rejected", "warming"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_translate_update_per_resource(docs, before, names, rejected, warming):
    cache = TranslationCache()
    accepted = None
    if before is not None:
        accepted = to_resources(before)
        first = translate_update(accepted, PLANES, cache)
        assert not first.rejected
    update = to_resources(docs)
    if accepted is not None:
        update = _share_unchanged(update, accepted)
    got = translate_update(update, PLANES, cache, accepted)
    assert _names(got.snapshot) == names
    assert {t: sorted(r) for t, r in got.rejected.items()} == rejected
    for bad in got.rejected.values():  # each reason names its resource
        for name, reason in bad.items():
            assert name in reason
    assert got.warming == warming


def _share_unchanged(update: XdsResources, accepted: XdsResources) -> XdsResources:
    """The state machine passes the very same message object for a resource an update did not change."""

    def pick(new, old):
        return MappingProxyType({n: (old[n] if n in old and old[n] == m else m) for n, m in new.items()})

    return XdsResources(
        pick(update.listeners, accepted.listeners),
        pick(update.routes, accepted.routes),
        pick(update.clusters, accepted.clusters),
        pick(update.endpoints, accepted.endpoints),
        update.versions,
    )


def test_previous_cluster_version_really_serves():
    accepted = to_resources([static_cluster(address="198.18.1.20")])
    cache = TranslationCache()
    translate_update(accepted, PLANES, cache)
    got = translate_update(to_resources([static_cluster(address="198.18.1.999")]), PLANES, cache, accepted)
    assert [e.address for e in got.snapshot.clusters["web"].endpoints] == ["198.18.1.20"]
    assert "not an IP" in got.rejected[CLUSTER]["web"]


def test_rejected_endpoints_keep_the_previous_assignment():
    accepted = to_resources([eds_cluster(), cla_doc(port=9000)])
    cache = TranslationCache()
    translate_update(accepted, PLANES, cache)
    update = _share_unchanged(to_resources([eds_cluster(), cla_doc(port=70000)]), accepted)
    got = translate_update(update, PLANES, cache, accepted)
    assert [e.port for e in got.snapshot.clusters["api"].endpoints] == [9000]
    assert list(got.rejected) == [ENDPOINT] and "endpoints[api]" in got.rejected[ENDPOINT]["api"]


def test_eds_cluster_without_assignment_has_no_endpoints():
    got = translate_update(to_resources([eds_cluster()]), PLANES)
    api = got.snapshot.clusters["api"]
    assert api.kind is ClusterKind.EDS and api.endpoints == ()


# ---- the state machine driven by translate_update (a fake ADS stream) --------------------------------


class Consumer:
    """XdsClient without the socket: answers every ApplyConfig with translate_update."""

    def __init__(self, mode=Mode.SOTW, **kw) -> None:
        self.state = AdsClientState(NODE, mode, **kw)
        self.cache = TranslationCache()
        self.snapshots = []
        self.sent = [a.request for a in self.state.stream_started(0.0) if isinstance(a, SendRequest)]

    def feed(self, resp, now=0.0) -> list:
        """Deliver one response; returns the requests it caused (after applying)."""
        out = []
        work = list(self.state.response_received(resp, now))
        while work:
            action = work.pop(0)
            if isinstance(action, SendRequest):
                out.append(action.request)
            elif isinstance(action, ApplyConfig):
                got = translate_update(action.resources, PLANES, self.cache, action.accepted)
                self.snapshots.append(got)
                work += self.state.apply_result(action.token, None, now, got.rejected)
        self.sent += out
        return out

    @property
    def last(self):
        return self.snapshots[-1]


def _answers(reqs, type_url):
    return [r for r in reqs if r.type_url == type_url and r.response_nonce]


def test_one_response_with_a_bad_listener_applies_the_good_one_and_nacks_only_the_bad():
    c = Consumer()
    c.feed(sotw(CLUSTER, "1", "c1", *msgs(PASS)))
    [ack] = _answers(c.feed(sotw(LISTENER, "1", "l1", *msgs(http_listener("good")))), LISTENER)
    assert ack.version_info == "1" and not ack.HasField("error_detail")
    bad2 = http_listener("bad2", address="198.18.1.1", port=70000)
    reqs = c.feed(sotw(LISTENER, "2", "l2", *msgs(http_listener("good", port=8080), BAD_LISTENER, bad2)))
    [nack] = _answers(reqs, LISTENER)
    # the new nonce, the previous version, one NACK naming both bad listeners and not the good one
    assert (nack.response_nonce, nack.version_info) == ("l2", "1")
    msg = nack.error_detail.message
    assert "listener[bad]" in msg and "listener[bad2]" in msg and "listener[good]" not in msg
    assert [x.port for x in c.last.snapshot.listeners if x.name.startswith("good")] == [8080, 8080]  # applied
    assert set(c.state.types[LISTENER].cache) == {"good"}
    assert c.state.types[CLUSTER].nacks == 0
    # the server fixes them: everything is ACKed with the new version
    [ack] = _answers(c.feed(sotw(LISTENER, "3", "l3", *msgs(http_listener("good", port=8080)))), LISTENER)
    assert ack.version_info == "3" and not ack.HasField("error_detail")


@pytest.mark.parametrize("mode", [Mode.SOTW, Mode.DELTA])
def test_removing_a_cluster_a_route_names_is_accepted(mode):
    c = Consumer(mode)
    web = msgs(static_cluster())
    c.feed(sotw(CLUSTER, "1", "c1", *web) if mode is Mode.SOTW else delta(CLUSTER, "c1", *web))
    lsn = msgs(http_listener("l1", rds="r1"))
    c.feed(sotw(LISTENER, "1", "l1", *lsn) if mode is Mode.SOTW else delta(LISTENER, "l1", *lsn))
    rc = msgs(routes("r1", route={"cluster": "web"}))
    c.feed(sotw(ROUTE, "1", "r1", *rc) if mode is Mode.SOTW else delta(ROUTE, "r1", *rc))
    assert _names(c.last.snapshot)["listeners"] == {"l1"}
    gone = sotw(CLUSTER, "2", "c2") if mode is Mode.SOTW else delta(CLUSTER, "c2", removed=["web"])
    [ack] = _answers(c.feed(gone, 1.0), CLUSTER)
    assert not ack.HasField("error_detail")
    assert c.last.snapshot.clusters == {} and "r1" in c.last.snapshot.routes  # the route answers 503 NC
    assert not c.last.rejected


def test_delta_removal_of_a_named_route_config_is_accepted_at_once():
    c = Consumer(Mode.DELTA)
    c.feed(delta(CLUSTER, "c1", *msgs(PASS)))
    c.feed(delta(LISTENER, "l1", *msgs(http_listener("l1", rds="r1"))))
    c.feed(delta(ROUTE, "r1", *msgs(routes("r1", route={"cluster": "pass"}))))
    [ack] = _answers(c.feed(delta(ROUTE, "r2", removed=["r1"]), 1.0), ROUTE)
    assert not ack.HasField("error_detail")
    assert "r1" in c.last.snapshot.routes and _names(c.last.snapshot)["listeners"] == {"l1"}  # last version serves


def test_listener_waits_for_a_new_route_config_then_is_applied_without_a_nack():
    c = Consumer(initial_fetch_timeout_s=5.0)
    c.feed(sotw(CLUSTER, "1", "c1", *msgs(PASS)))
    reqs = c.feed(sotw(LISTENER, "1", "l1", *msgs(http_listener("l1", rds="r1"))))
    assert [list(r.resource_names) for r in reqs if r.type_url == ROUTE] == [["r1"]]
    assert _answers(reqs, LISTENER) == []  # warming: waits for r1 before applying (and ACKing)
    reqs = c.feed(sotw(ROUTE, "1", "r1", *msgs(routes("r1", route={"cluster": "pass"}))))
    assert {r.type_url for r in _answers(reqs, LISTENER) + _answers(reqs, ROUTE)} == {LISTENER, ROUTE}
    assert all(not r.HasField("error_detail") for r in reqs)
    assert _names(c.last.snapshot)["listeners"] == {"l1"}


def test_route_config_that_never_comes_times_out_into_warming_not_a_nack():
    c = Consumer(initial_fetch_timeout_s=5.0)
    c.feed(sotw(CLUSTER, "1", "c1", *msgs(PASS)))
    before = len(c.snapshots)
    c.feed(sotw(LISTENER, "1", "l1", *msgs(http_listener("l1", rds="r1"), http_listener("l2", port=81))))
    assert len(c.snapshots) == before  # waiting for r1
    out = []
    work = c.state.timer_fired(6.0)
    for action in work:
        if isinstance(action, ApplyConfig):
            got = translate_update(action.resources, PLANES, c.cache, action.accepted)
            out += c.state.apply_result(action.token, None, 6.0, got.rejected)
            assert got.warming == ("l1",) and _names(got.snapshot)["listeners"] == {"l2"}
    [ack] = _answers([a.request for a in out if isinstance(a, SendRequest)], LISTENER)
    assert not ack.HasField("error_detail") and ack.version_info == "1"


def test_delta_rejected_resource_keeps_its_old_version_for_the_next_stream():
    c = Consumer(Mode.DELTA)
    c.feed(delta(CLUSTER, "a", *msgs(static_cluster(), static_cluster("db", port=5432))))
    [nack] = _answers(c.feed(delta(CLUSTER, "b", *msgs(static_cluster(port=0), static_cluster("db", port=5433)))),
                      CLUSTER)  # fmt: skip
    assert "cluster[web]" in nack.error_detail.message and "cluster[db]" not in nack.error_detail.message
    cache = c.state.types[CLUSTER].cache
    assert (cache["web"].version, cache["db"].version) == ("v-a", "v-b")
    c.state.stream_reset(1.0)
    [first] = [a.request for a in c.state.stream_started(2.0) if a.request.type_url == CLUSTER]
    assert dict(first.initial_resource_versions) == {"web": "v-a", "db": "v-b"}  # the server resends web
