"""TranslationCache: unchanged resources are reused, changed ones retranslated, bad ones never cached."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2

from planemesh.model.config import ConfigError
from planemesh.model.static_config import load_default_config
from planemesh.xds.client_state import XdsResources
from planemesh.xds.translate import TranslationCache, translate

PLANES = load_default_config().planes


def eds_cluster(name: str) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    return c


def cla(name: str, *ports: int, address: str = "198.18.1.10") -> endpoint_pb2.ClusterLoadAssignment:
    out = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    lle = out.endpoints.add()
    for port in ports:
        sock = address_pb2.SocketAddress(address=address, port_value=port)
        lle.lb_endpoints.add().endpoint.address.socket_address.CopyFrom(sock)
    return out


def route(name: str, cluster: str) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    vh = rc.virtual_hosts.add(name="any", domains=["*"])
    r = vh.routes.add()
    r.match.prefix = "/"
    r.route.cluster = cluster
    return rc


def resources(clusters: dict, endpoints: dict, routes: dict | None = None) -> XdsResources:
    return XdsResources(
        listeners=MappingProxyType({}),
        routes=MappingProxyType(routes or {}),
        clusters=MappingProxyType(clusters),
        endpoints=MappingProxyType(endpoints),
        versions=MappingProxyType({"CDS": "1"}),
    )


def world(n: int = 20) -> tuple[dict, dict]:
    names = [f"c{i}" for i in range(n)]
    return {n: eds_cluster(n) for n in names}, {n: cla(n, 8000 + i, 9000 + i) for i, n in enumerate(names)}


def test_one_changed_endpoint_set_retranslates_one_cluster_with_the_same_result_as_no_cache() -> None:
    clusters, endpoints = world()
    cache = TranslationCache()
    first = translate(resources(clusters, endpoints), PLANES, cache)
    assert (cache.hits, cache.misses) == (0, 20)
    endpoints = {**endpoints, "c7": cla("c7", 7777)}
    second = translate(resources(clusters, endpoints), PLANES, cache)
    assert (cache.hits, cache.misses) == (19, 21)
    assert second.clusters["c7"].endpoints[0].port == 7777
    assert second.clusters["c3"] is first.clusters["c3"]  # reused, not rebuilt
    uncached = translate(resources(clusters, endpoints), PLANES)
    assert dict(second.clusters) == dict(uncached.clusters)


@pytest.mark.parametrize(
    ("change", "hits_misses"),
    [
        # SotW resends every resource as a new message: equal bytes are a hit (bench/scale.py, one endpoint).
        pytest.param(lambda c, e: ({**c, "c1": eds_cluster("c1")}, e), (3, 3), id="new cluster message, same bytes"),
        pytest.param(lambda c, e: (c, {**e, "c1": cla("c1", 8001, 9001)}), (3, 3), id="new CLA message, same bytes"),
        pytest.param(lambda c, e: (c, {**e, "c1": cla("c1", 1)}), (2, 4), id="new endpoint message"),
    ],
)
def test_a_new_message_is_a_miss_only_when_its_content_differs(change, hits_misses) -> None:
    clusters, endpoints = world(3)
    cache = TranslationCache()
    first = translate(resources(clusters, endpoints), PLANES, cache)
    second = translate(resources(*change(clusters, endpoints)), PLANES, cache)
    assert (cache.hits, cache.misses) == hits_misses
    assert (second.clusters["c1"] is first.clusters["c1"]) == (hits_misses == (3, 3))


def test_other_planes_invalidate() -> None:
    clusters, endpoints = world(3)
    cache = TranslationCache()
    translate(resources(clusters, endpoints), PLANES, cache)
    planes = (dataclasses.replace(PLANES[0], proxy_port=PLANES[0].proxy_port + 100), *PLANES[1:])
    translate(resources(clusters, endpoints), planes, cache)
    assert cache.hits == 0 and cache.misses == 6


def test_a_bad_resource_is_never_cached_and_keeps_failing_until_fixed() -> None:
    clusters, endpoints = world(3)
    endpoints["c2"] = cla("c2", 80, address="not-an-ip")
    cache = TranslationCache()
    for _ in range(2):
        with pytest.raises(ConfigError) as err:
            translate(resources(clusters, endpoints), PLANES, cache)
        assert "not-an-ip" in str(err.value) and "c2" in str(err.value)
    endpoints["c2"] = cla("c2", 80)
    snap = translate(resources(clusters, endpoints), PLANES, cache)
    assert snap.clusters["c2"].endpoints[0].address == "198.18.1.10"


def test_removed_resources_leave_the_cache_and_routes_are_cached_too() -> None:
    clusters, endpoints = world(3)
    rc = route("r", "c0")
    cache = TranslationCache()
    first = translate(resources(clusters, endpoints, {"r": rc}), PLANES, cache)
    del clusters["c1"]
    second = translate(resources(clusters, endpoints, {"r": rc}), PLANES, cache)
    assert second.routes["r"] is first.routes["r"] and "c1" not in second.clusters
    assert cache.hits == 3 and cache.misses == 4
    clusters["c1"] = eds_cluster("c1")  # back again: translated anew, not from a stale entry
    translate(resources(clusters, endpoints, {"r": rc}), PLANES, cache)
    assert cache.misses == 5
