"""Cluster builders: model clusters for the proxy tiers, Envoy resource documents for the xDS tiers."""

from __future__ import annotations

from typing import Any, Protocol

import yaml
from google.protobuf import any_pb2

from planemesh.model.config import Cluster, ClusterKind, Endpoint
from planemesh.xds.resources import parse_resource_text

T = "type.googleapis.com/"
# One plane on loopback: enough for translation in xDS client tests.
LOOPBACK_PLANES = [{"name": "lo", "id": 1, "interfaces": ["lo"], "cidrs": ["127.0.0.0/8", "::1/128"]}]


class HasPort(Protocol):
    port: int


def endpoint(server: HasPort | int, address: str = "127.0.0.1", **kw: Any) -> Endpoint:
    """An endpoint at a test server (anything with a .port) or a port on loopback."""
    return Endpoint(address=address, port=server if isinstance(server, int) else server.port, **kw)


def static_cluster(name: str, endpoints: Any, **kw: Any) -> Cluster:
    """A STATIC cluster of these endpoints; `kw`: any other Cluster field (http2, lb_policy, breakers...)."""
    return Cluster(name=name, kind=ClusterKind.STATIC, endpoints=tuple(endpoints), **kw)


def cluster_doc(name: str, address: str = "127.0.0.1", port: int = 8080) -> dict:
    """An Envoy STATIC Cluster resource with one endpoint, as a YAML/JSON document."""
    return {
        "@type": T + "envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": address,
                                                                                 "port_value": port}}}}]}
            ],
        },
    }  # fmt: skip


def packed(*docs: dict) -> list[any_pb2.Any]:
    """Resource documents as the Any's a DiscoveryResponse carries."""
    return parse_resource_text(yaml.safe_dump(list(docs)), "test")
