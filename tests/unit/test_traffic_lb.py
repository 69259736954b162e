"""Load-balancing policies: table tests and hypothesis properties (pure, no I/O)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planemesh.agent.proxy.lb import ClusterLb, build_maglev_table, hash64, smooth_weighted_sequence
from planemesh.model.config import Cluster, ClusterKind, Endpoint, LbPolicy


def eps(n: int, **kw) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(address=f"10.0.0.{i + 1}", port=80, **kw) for i in range(n))


def cluster(endpoints, policy=LbPolicy.ROUND_ROBIN) -> Cluster:
    return Cluster(name="c", kind=ClusterKind.STATIC, endpoints=tuple(endpoints), lb_policy=policy)


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ([1, 1, 1], [0, 1, 2]),
        ([5, 1, 1], [0, 0, 1, 0, 2, 0, 0]),  # nginx's documented smooth order
        ([2, 1], [0, 1, 0]),
        ([1], [0]),
    ],
)
def test_smooth_weighted_sequence(weights, expected) -> None:
    assert smooth_weighted_sequence(weights) == expected


def test_round_robin_cycles_and_respects_weights() -> None:
    endpoints = (Endpoint("10.0.0.1", 80, weight=3), Endpoint("10.0.0.2", 80, weight=1))
    lb = ClusterLb(cluster(endpoints))
    picks = Counter(lb.pick().address for _ in range(400))
    assert picks == {"10.0.0.1": 300, "10.0.0.2": 100}


def test_round_robin_skips_unavailable() -> None:
    lb = ClusterLb(cluster(eps(3)))
    picks = {lb.pick(available=lambda e: e.address != "10.0.0.2").address for _ in range(10)}
    assert picks == {"10.0.0.1", "10.0.0.3"}
    assert lb.pick(available=lambda e: False) is None


def test_unhealthy_endpoints_never_picked() -> None:
    endpoints = (*eps(2), Endpoint("10.0.0.9", 80, healthy=False))
    lb = ClusterLb(cluster(endpoints, LbPolicy.RANDOM), random.Random(3))
    assert {lb.pick().address for _ in range(200)} == {"10.0.0.1", "10.0.0.2"}


def test_priority_failover_uses_lowest_level_with_available_endpoints() -> None:
    endpoints = (
        Endpoint("10.0.0.1", 80, priority=0, locality="a"),
        Endpoint("10.0.0.2", 80, priority=1),
        Endpoint("10.0.0.3", 80, priority=2),
    )
    lb = ClusterLb(cluster(endpoints))
    assert {lb.pick().address for _ in range(5)} == {"10.0.0.1"}
    down = {"10.0.0.1"}
    assert {lb.pick(available=lambda e: e.address not in down).address for _ in range(5)} == {"10.0.0.2"}
    down = {"10.0.0.1", "10.0.0.2"}
    assert lb.pick(available=lambda e: e.address not in down).address == "10.0.0.3"


def test_priority_zero_unhealthy_in_eds_fails_over() -> None:
    endpoints = (Endpoint("10.0.0.1", 80, priority=0, healthy=False), Endpoint("10.0.0.2", 80, priority=1))
    assert ClusterLb(cluster(endpoints)).pick().address == "10.0.0.2"


def test_least_request_prefers_idle_endpoint() -> None:
    endpoints = eps(2)
    lb = ClusterLb(cluster(endpoints, LbPolicy.LEAST_REQUEST), random.Random(1))
    for _ in range(5):
        lb.started(endpoints[0])
    assert {lb.pick().address for _ in range(50)} == {"10.0.0.2"}  # with two endpoints P2C sees both
    for _ in range(5):
        lb.ended(endpoints[0])
    assert lb.active == {}


def test_random_weighted_distribution() -> None:
    endpoints = (Endpoint("10.0.0.1", 80, weight=9), Endpoint("10.0.0.2", 80, weight=1))
    lb = ClusterLb(cluster(endpoints, LbPolicy.RANDOM), random.Random(7))
    share = Counter(lb.pick().address for _ in range(5000))["10.0.0.1"] / 5000
    assert 0.87 < share < 0.93


@pytest.mark.parametrize("policy", [LbPolicy.RING_HASH, LbPolicy.MAGLEV])
def test_hash_policies_are_sticky_and_spread(policy) -> None:
    lb = ClusterLb(cluster(eps(4), policy))
    keys = [hash64(f"user-{i}".encode()) for i in range(2000)]
    first = [lb.pick(k).address for k in keys]
    assert first == [lb.pick(k).address for k in keys]  # same key, same endpoint
    counts = Counter(first)
    assert len(counts) == 4 and min(counts.values()) > 2000 / 4 * 0.6


@pytest.mark.parametrize("policy", [LbPolicy.RING_HASH, LbPolicy.MAGLEV])
@pytest.mark.parametrize("n", [4, 10])
def test_consistent_hashing_moves_about_one_nth(policy, n) -> None:
    keys = [hash64(f"k{i}".encode()) for i in range(3000)]
    before = ClusterLb(cluster(eps(n), policy))
    after = ClusterLb(cluster(eps(n)[:-1], policy))  # one endpoint leaves
    moved = sum(before.pick(k) != after.pick(k) for k in keys) / len(keys)
    assert moved == pytest.approx(1 / n, abs=0.5 / n)
    if policy is LbPolicy.RING_HASH:  # a ring moves only the keys of the endpoint that left
        gone = eps(n)[-1]
        assert all(before.pick(k) == after.pick(k) for k in keys if before.pick(k) != gone)


def test_hash_without_key_falls_back_to_random() -> None:
    lb = ClusterLb(cluster(eps(3), LbPolicy.RING_HASH), random.Random(5))
    assert len({lb.pick(None).address for _ in range(100)}) == 3


def test_maglev_table_weights() -> None:
    table = build_maglev_table([b"a", b"b"], [3, 1], 5003)
    share = table.count(0) / len(table)
    assert -1 not in table and 0.70 < share < 0.80


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8),
    st.sampled_from(list(LbPolicy)),
    st.integers(min_value=0, max_value=2**64 - 1),
)
def test_property_pick_is_always_a_healthy_available_endpoint(weights, policy, key) -> None:
    endpoints = tuple(Endpoint(f"10.0.1.{i}", 80, weight=w) for i, w in enumerate(weights))
    lb = ClusterLb(cluster(endpoints, policy), random.Random(key))
    banned = endpoints[0].address
    ep = lb.pick(key, available=lambda e: e.address != banned)
    if len(endpoints) == 1:
        assert ep is None
    else:
        assert ep in endpoints and ep.address != banned


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=2, max_value=12), st.integers(min_value=0, max_value=2**64 - 1))
def test_property_ring_hash_removing_an_endpoint_moves_only_its_keys(n, key) -> None:
    before = ClusterLb(cluster(eps(n), LbPolicy.RING_HASH))
    after = ClusterLb(cluster(eps(n)[:-1], LbPolicy.RING_HASH))
    if before.pick(key) != eps(n)[-1]:
        assert after.pick(key) == before.pick(key)


@pytest.mark.parametrize(
    ("weights", "first_ten"),
    [
        ((90, 10), ["a"] * 5 + ["b"] + ["a"] * 4),  # interleaved, not ten in a row
        ((75, 25), ["a", "a", "b", "a"] * 2 + ["a", "a"]),
        ((0, 5), ["b"] * 10),
    ],
)
def test_weighted_clusters_interleave_exact_shares(weights, first_ten) -> None:
    from types import MappingProxyType

    from planemesh.agent.proxy.balancer import Balancer
    from planemesh.model.config import RouteAction, Snapshot, WeightedCluster

    snap = Snapshot(version="1", planes=(), clusters=MappingProxyType({"a": cluster(eps(1)), "b": cluster(eps(1))}))
    balancer = Balancer(snap)
    action = RouteAction(weighted=(WeightedCluster("a", weights[0]), WeightedCluster("b", weights[1])))
    names = ["a" if balancer.cluster_for(action) is snap.clusters["a"] else "b" for _ in range(1000)]
    assert names[:10] == first_ten
    assert names.count("b") == 1000 * weights[1] // sum(weights)


# ---- locality weighting (Envoy: effective weight = weight x min(1, 1.4 x available share)) -----------


def locality_eps(spec: list[tuple[str, int, int, int]], priority: int = 0) -> list[Endpoint]:
    """(locality, locality weight, healthy endpoints, EDS-unhealthy endpoints) -> endpoints."""
    out = []
    for n, (name, weight, up, down) in enumerate(spec):
        out += [Endpoint(f"10.{priority}.{n}.{i + 1}", 80, priority=priority, locality=name, locality_weight=weight,
                         healthy=i < up) for i in range(up + down)]  # fmt: skip
    return out


def locality_cluster(endpoints, policy=LbPolicy.ROUND_ROBIN) -> Cluster:
    return Cluster(name="c", kind=ClusterKind.STATIC, endpoints=tuple(endpoints), lb_policy=policy,
                   locality_weighted=True)  # fmt: skip


def by_locality(lb: ClusterLb, n: int, available=None) -> Counter:
    kw = {} if available is None else {"available": available}
    return Counter(lb.pick(**kw).locality for _ in range(n))


@pytest.mark.parametrize("policy", [LbPolicy.ROUND_ROBIN, LbPolicy.LEAST_REQUEST, LbPolicy.RANDOM])
def test_locality_weights_split_exactly_and_endpoint_policy_applies_within(policy) -> None:
    endpoints = locality_eps([("eu/a", 3, 2, 0), ("eu/b", 1, 1, 0)])
    lb = ClusterLb(locality_cluster(endpoints, policy), random.Random(2))
    picks = [lb.pick() for _ in range(400)]
    assert Counter(ep.locality for ep in picks) == {"eu/a": 300, "eu/b": 100}  # smooth weighted: exact
    assert len({ep.address for ep in picks if ep.locality == "eu/a"}) == 2


def test_without_locality_weighting_locality_weights_are_ignored() -> None:
    endpoints = locality_eps([("eu/a", 3, 1, 0), ("eu/b", 1, 1, 0)])
    assert by_locality(ClusterLb(cluster(endpoints)), 400) == {"eu/a": 200, "eu/b": 200}


def test_locality_without_weight_gets_nothing_unless_none_has_one() -> None:
    lb = ClusterLb(locality_cluster(locality_eps([("eu/a", 1, 1, 0), ("eu/b", 0, 1, 0)])))
    assert by_locality(lb, 50) == {"eu/a": 50}
    unweighted = ClusterLb(locality_cluster(locality_eps([("eu/a", 0, 1, 0), ("eu/b", 0, 1, 0)])))
    assert by_locality(unweighted, 50) == {"eu/a": 25, "eu/b": 25}  # Envoy: the level's hosts, as without


def test_locality_health_share_scales_its_weight_with_overprovisioning() -> None:
    # eu/a: 1 of 4 healthy in EDS -> 1 x min(1, 1.4 x 0.25) = 0.35; eu/b: 3 of 4 -> min(1, 1.05) = 1.
    lb = ClusterLb(locality_cluster(locality_eps([("eu/a", 1, 1, 3), ("eu/b", 1, 3, 1)])))
    counts = by_locality(lb, 1350)
    assert counts["eu/a"] == pytest.approx(350, abs=1) and counts["eu/b"] == pytest.approx(1000, abs=1)


def test_ejected_endpoints_shift_locality_load_at_once() -> None:
    endpoints = locality_eps([("eu/a", 1, 4, 0), ("eu/b", 1, 4, 0)])
    lb = ClusterLb(locality_cluster(endpoints))
    assert by_locality(lb, 200) == {"eu/a": 100, "eu/b": 100}
    ejected = {ep.address for ep in endpoints[:3]}  # 3 of eu/a's 4: 1 x min(1, 1.4 x 0.25) = 0.35
    counts = by_locality(lb, 1350, available=lambda e: e.address not in ejected)
    assert counts["eu/a"] == pytest.approx(350, abs=1) and counts["eu/b"] == pytest.approx(1000, abs=1)
    all_of_a = {ep.address for ep in endpoints if ep.locality == "eu/a"}
    assert by_locality(lb, 50, available=lambda e: e.address not in all_of_a) == {"eu/b": 50}


def test_priority_failover_comes_before_locality_choice() -> None:
    endpoints = [*locality_eps([("eu/a", 3, 1, 0), ("eu/b", 1, 1, 0)]),
                 *locality_eps([("us/a", 1, 1, 0)], priority=1)]  # fmt: skip
    lb = ClusterLb(locality_cluster(endpoints))
    assert set(by_locality(lb, 40)) == {"eu/a", "eu/b"}
    p0 = {ep.address for ep in endpoints if ep.priority == 0}
    assert by_locality(lb, 10, available=lambda e: e.address not in p0) == {"us/a": 10}
