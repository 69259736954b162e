"""Envoy's internal_upstream transport socket and internal listeners (xds/translate_internal.py): the wrapped
socket is what planemesh uses, internal-address endpoints are refused by name, internal listeners serve nothing."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from planemesh.model.config import ConfigError
from planemesh.xds.translate_clusters import translate_cluster
from planemesh.xds.translate_internal import WHY_INTERNAL_LISTENER, WHY_UNWRAPPED
from tests.unit.test_xds_istio_translate import RAW, TLS_UP, cluster, run, tcp
from tests.unit.test_xds_translate import PLANES, T

INTERNAL = T + "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport"
EP = {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "10.244.0.178", "port_value": 80}}}}]}


def internal(inner=None):
    cfg = {
        "@type": INTERNAL,
        "passthrough_metadata": [{"kind": {"host": {}}, "name": "envoy.filters.listener.original_dst"}],
    }
    if inner is not None:
        cfg["transport_socket"] = inner
    return {"name": "internal_upstream", "typed_config": cfg}


def _cluster(**fields):
    return cluster(load_assignment={"cluster_name": "c", "endpoints": [EP]}, **fields)


@pytest.mark.parametrize(("inner", "tls"), [(RAW, False), (None, False), (TLS_UP, True)])
def test_internal_upstream_is_the_socket_it_wraps(inner, tls):
    snap, notes = run([_cluster(transport_socket=internal(inner))])
    c = snap.clusters["c"]
    assert (c.tls is not None) is tls and c.endpoints[0].address == "10.244.0.178"
    assert ("cluster[c].transport_socket", WHY_UNWRAPPED) in notes


def test_internal_upstream_inside_transport_socket_matches():
    matches = [{"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": internal(TLS_UP)}]
    snap, notes = run([_cluster(transport_socket_matches=matches)])
    assert snap.clusters["c"].tls_matches[0].tls is not None
    assert ("cluster[c].transport_socket_matches[0].transport_socket", WHY_UNWRAPPED) in notes


def test_an_internal_address_endpoint_is_refused_by_name():
    ep = {"lb_endpoints": [{"endpoint": {"address": {"envoy_internal_address": {"server_listener_name": "x"}}}}]}
    doc = cluster(load_assignment={"cluster_name": "c", "endpoints": [ep]}, transport_socket=internal(RAW))
    with pytest.raises(ConfigError) as err:
        run([doc])
    assert "lb_endpoints[0].endpoint.address" in str(err.value) and "envoy_internal_address" in str(err.value)


def _internal_listener(**extra):
    return {
        "@type": T + "envoy.config.listener.v3.Listener",
        "name": "main_internal",
        "internal_listener": {},
        "filter_chains": [{"filters": [tcp()]}],
        **extra,
    }


def test_an_internal_listener_is_accepted_and_serves_nothing():
    snap, notes = run([_internal_listener()])
    assert not [lsn for lsn in snap.listeners if lsn.name.startswith("main_internal")]
    assert ("listener[main_internal].internal_listener", WHY_INTERNAL_LISTENER) in notes


def test_an_internal_listener_with_an_address_is_refused():
    with pytest.raises(ConfigError) as err:
        run([_internal_listener(address={"socket_address": {"address": "0.0.0.0", "port_value": 1}})])
    assert "listener[main_internal].address" in str(err.value)


def test_a_malformed_internal_upstream_config_is_refused_not_crashed():
    c = cluster_pb2.Cluster(name="c", type=cluster_pb2.Cluster.STATIC)
    c.transport_socket.name = "internal_upstream"
    c.transport_socket.typed_config.type_url = INTERNAL
    c.transport_socket.typed_config.value = b"\xff\xff\xff"
    with pytest.raises(ConfigError) as err:
        translate_cluster(c, {}, PLANES, "cluster[c]")
    assert "cluster[c].transport_socket.typed_config" in str(err.value) and "malformed" in str(err.value)
