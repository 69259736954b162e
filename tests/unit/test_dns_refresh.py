"""agent/proxy/dns.py (sans-IO): when each DNS cluster is resolved and the endpoints the answers make."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from planemesh.agent.proxy.balancer import Balancer
from planemesh.agent.proxy.dns import DnsRefresh, by_family
from planemesh.model.config import Cluster, ClusterKind, DnsSettings, Endpoint, OutlierDetection, Snapshot


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def dns_cluster(name="c", hosts=(("api.example.com", 443),), kind=ClusterKind.STRICT_DNS, **settings) -> Cluster:
    eps = tuple(Endpoint(h, p, weight=2, locality="r/z") for h, p in hosts)
    return Cluster(name, kind=kind, dns=DnsSettings(hosts=eps, **settings))


def test_a_new_cluster_is_due_at_once_then_every_refresh_rate():
    clock = Clock()
    r = DnsRefresh(clock)
    r.sync({"c": dns_cluster(refresh_s=60.0)})
    assert r.due() == [("c", ("api.example.com",))]
    assert r.due() == [] and r.next_due() is None  # pending: not asked twice
    assert r.resolved("c", {"api.example.com": ["10.0.0.1", "10.0.0.2"]})
    eps, gen = r.endpoints("c")
    assert [(e.address, e.port, e.weight, e.locality) for e in eps] == [
        ("10.0.0.1", 443, 2, "r/z"),
        ("10.0.0.2", 443, 2, "r/z"),
    ]
    assert r.next_due() == 160.0
    clock.t = 159.0
    assert r.due() == []
    clock.t = 160.0
    assert r.due() == [("c", ("api.example.com",))]
    assert not r.resolved("c", {"api.example.com": ["10.0.0.1", "10.0.0.2"]})  # same answer: no change
    assert r.endpoints("c")[1] == gen
    clock.t = 220.0
    r.due()
    assert r.resolved("c", {"api.example.com": ["10.0.0.3"]})  # a new address: new endpoints, no snapshot
    assert [e.address for e in r.endpoints("c")[0]] == ["10.0.0.3"] and r.endpoints("c")[1] == gen + 1


def test_a_failed_lookup_keeps_the_previous_addresses_and_retries_at_the_failure_rate():
    clock = Clock()
    r = DnsRefresh(clock)
    r.sync({"c": dns_cluster(refresh_s=60.0, failure_refresh_s=2.0)})
    r.due()
    r.resolved("c", {"api.example.com": ["10.0.0.1"]})
    clock.t = 160.0
    r.due()
    assert not r.resolved("c", {"api.example.com": None})  # nothing changed
    assert [e.address for e in r.endpoints("c")[0]] == ["10.0.0.1"]
    assert r.next_due() == 162.0 and r.failures("c") == 1


def test_logical_dns_uses_the_first_address_only():
    r = DnsRefresh(Clock())
    r.sync({"c": dns_cluster(kind=ClusterKind.LOGICAL_DNS)})
    r.due()
    r.resolved("c", {"api.example.com": ["10.0.0.7", "10.0.0.8"]})
    assert [e.address for e in r.endpoints("c")[0]] == ["10.0.0.7"]


def test_a_snapshot_with_the_same_hosts_keeps_answers_and_timer_other_hosts_start_over():
    clock = Clock()
    r = DnsRefresh(clock)
    r.sync({"c": dns_cluster(refresh_s=60.0)})
    r.due()
    r.resolved("c", {"api.example.com": ["10.0.0.1"]})
    r.sync({"c": dns_cluster(refresh_s=30.0), "s": Cluster("s", kind=ClusterKind.STATIC)})
    assert [e.address for e in r.endpoints("c")[0]] == ["10.0.0.1"] and r.due() == []
    assert r.endpoints("s") is None  # not a DNS cluster
    r.sync({"c": dns_cluster(hosts=(("other.example.com", 443),))})
    assert r.endpoints("c")[0] == () and r.due() == [("c", ("other.example.com",))]
    r.sync({})
    assert r.endpoints("c") is None and not r.resolved("c", {"other.example.com": ["10.0.0.9"]})


def test_ip_literal_hosts_need_no_lookup():
    r = DnsRefresh(Clock())
    r.sync({"c": dns_cluster(hosts=(("10.1.1.1", 80), ("2001:db8::1", 80)))})
    assert [e.address for e in r.endpoints("c")[0]] == ["10.1.1.1", "2001:db8::1"]
    assert r.due() == [] and r.next_due() is None


def test_lookup_family():
    answers = ["2001:db8::1", "10.0.0.1", "10.0.0.1", "2001:db8::2"]
    assert by_family(answers, "v4") == ["10.0.0.1"]
    assert by_family(answers, "v6") == ["2001:db8::1", "2001:db8::2"]
    assert by_family(answers, "auto") == ["2001:db8::1", "2001:db8::2"]
    assert by_family(["10.0.0.1"], "auto") == ["10.0.0.1"]
    assert by_family(answers, "v4_preferred") == ["10.0.0.1"]
    assert by_family(answers, "all") == ["2001:db8::1", "10.0.0.1", "2001:db8::2"]
    r = DnsRefresh(Clock())
    r.sync({"c": dns_cluster(family="v4")})
    r.due()
    assert not r.resolved("c", {"api.example.com": ["2001:db8::1"]})  # no v4 answer: a failure
    assert r.failures("c") == 1


def test_the_balancer_picks_among_the_addresses_resolved_now():
    """Balancer + DnsRefresh: a new answer changes the picks of the same snapshot's cluster; the outlier
    detector's host count follows."""
    clock = Clock()
    c = dataclasses.replace(dns_cluster(refresh_s=1.0), outlier=OutlierDetection())
    snap = Snapshot(version="1", planes=(), listeners=(), clusters=MappingProxyType({"c": c}))
    refresh = DnsRefresh(clock)
    refresh.sync(snap.clusters)
    bal = Balancer(snap, clock=clock)
    bal.dns = refresh
    assert bal.pick_endpoint(c) is None  # no answer yet
    refresh.due()
    refresh.resolved("c", {"api.example.com": ["10.0.0.1", "10.0.0.2"]})
    assert {bal.pick_endpoint(c).address for _ in range(4)} == {"10.0.0.1", "10.0.0.2"}
    assert bal.outlier(c).host_count == 2
    clock.t += 1.0
    refresh.due()
    refresh.resolved("c", {"api.example.com": ["10.0.0.3"]})
    assert {bal.pick_endpoint(c).address for _ in range(4)} == {"10.0.0.3"}
    assert bal.outlier(c).host_count == 1
