"""STRICT_DNS / LOGICAL_DNS clusters (xds/translate_dns.py): hosts kept by name with the refresh settings;
bad names and custom resolvers NACKed naming the field."""

from __future__ import annotations

import copy

import pytest

from planemesh.model.config import ClusterKind, ConfigError
from planemesh.xds.translate_dns import WHY_TTL
from tests.unit.test_xds_istio_translate import cluster, run

HOST = {"endpoint": {"address": {"socket_address": {"address": "api.example.com", "port_value": 443}}}}


def dns(kind="STRICT_DNS", hosts=(HOST,), **fields):
    la = {"cluster_name": "c", "endpoints": [{"lb_endpoints": list(copy.deepcopy(hosts))}]}
    return cluster(type=kind, load_assignment=la, **fields)


def test_istiods_service_entry_cluster():
    snap, notes = run([dns(dns_refresh_rate="60s", respect_dns_ttl=True, dns_lookup_family="V4_ONLY")])
    c = snap.clusters["c"]
    assert c.kind is ClusterKind.STRICT_DNS and c.endpoints == ()
    assert [(h.address, h.port) for h in c.dns.hosts] == [("api.example.com", 443)]
    assert (c.dns.refresh_s, c.dns.family, c.dns.respect_ttl) == (60.0, "v4", True)
    assert ("cluster[c].respect_dns_ttl", WHY_TTL) in notes


def test_defaults_are_envoys():
    snap, _ = run([dns(kind="LOGICAL_DNS", dns_failure_refresh_rate={"base_interval": "2s", "max_interval": "9s"})])
    c = snap.clusters["c"]
    assert c.kind is ClusterKind.LOGICAL_DNS
    assert (c.dns.refresh_s, c.dns.failure_refresh_s, c.dns.family) == (5.0, 2.0, "auto")


def _bad(name):
    return {"endpoint": {"address": {"socket_address": {"address": name, "port_value": 443}}}}


@pytest.mark.parametrize(
    ("doc", "where", "reason"),
    [
        (dns(hosts=(_bad("bad_name-.example.com"),)), "socket_address.address", "valid DNS name"),
        (dns(hosts=(_bad("a..b"),)), "socket_address.address", "valid DNS name"),
        (dns(hosts=(_bad(""),)), "socket_address.address", "valid DNS name"),
        (dns(hosts=(_bad("x" * 64 + ".com"),)), "socket_address.address", "valid DNS name"),
        (dns(kind="LOGICAL_DNS", hosts=(HOST, _bad("b.example.com"))), "load_assignment", "single lb_endpoint"),
        (dns(hosts=()), "load_assignment", "at least one host"),
        (dns(dns_refresh_rate="0s"), "dns_refresh_rate", "greater than 1ms"),
        (
            dns(dns_resolvers=[{"socket_address": {"address": "127.0.0.1", "port_value": 53}}]),
            "dns_resolvers",
            "not supported",
        ),
        (dns(use_tcp_for_dns_lookups=True), "use_tcp_for_dns_lookups", "not supported"),
    ],
    ids=[
        "label-ends-with-dash",
        "empty-label",
        "empty",
        "long-label",
        "logical-two-hosts",
        "no-host",
        "rate-0",
        "custom-resolver",
        "tcp-lookups",
    ],
)
def test_bad_dns_clusters_are_refused_by_name(doc, where, reason):
    with pytest.raises(ConfigError) as err:
        run([doc])
    assert "cluster[c]" in str(err.value) and where in str(err.value) and reason in str(err.value), str(err.value)
