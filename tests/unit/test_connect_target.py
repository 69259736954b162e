"""The CONNECT-target decision (issue 11, finding 5: CONNECT through an original-destination route was an open
proxy to the node's loopback, its own addresses and other planes)."""

from __future__ import annotations

import pytest

from planemesh.agent.proxy.connect_target import (
    LOOPBACK,
    NODE_ADDRESS,
    NOT_IN_CLUSTER,
    OWN_PORT,
    connect_refusal,
    is_node_address,
)
from planemesh.model.config import Cluster, ClusterKind, Endpoint

NODE = {"198.18.1.1", "fd00:18:1::1", "10.0.0.5"}  # the node's own addresses in this table
DB = Cluster(name="db", kind=ClusterKind.STATIC,
             endpoints=(Endpoint("198.18.1.20", 5432), Endpoint("127.0.0.1", 6432)))  # fmt: skip
ODST = Cluster(name="passthrough", kind=ClusterKind.ORIGINAL_DST)
LISTEN = {15001, 15006}

CASES = [
    # (target the tunnel would open, route's cluster, client's authority) -> refusal or None
    # Original destination: where the client's packet went; the authority plays no part.
    ((("198.18.1.20", 8080), None, ("198.18.1.20", 8080)), None),
    ((("198.18.1.20", 8080), None, ("127.0.0.1", 22)), None),  # the target is the original destination
    ((("198.18.1.20", 8080), ODST, ("localhost", 22)), None),
    ((("::ffff:198.18.1.20", 8080), None, None), None),
    ((("127.0.0.1", 8080), None, ("127.0.0.1", 8080)), LOOPBACK),
    ((("127.3.2.1", 8080), ODST, None), LOOPBACK),
    ((("::1", 8080), None, None), LOOPBACK),
    ((("::ffff:127.0.0.1", 8080), None, None), LOOPBACK),
    ((("0.0.0.0", 8080), None, None), LOOPBACK),
    ((("::", 8080), ODST, None), LOOPBACK),
    ((("198.18.1.1", 8080), None, None), NODE_ADDRESS),
    ((("fd00:18:1::1", 8080), ODST, None), NODE_ADDRESS),
    ((("10.0.0.5", 22), None, ("10.0.0.5", 22)), NODE_ADDRESS),
    ((("198.18.1.20", 15001), None, None), OWN_PORT),  # not intercepted: the proxy itself
    # A cluster: its endpoint (the balancer's pick); an IP authority must be one of its endpoints.
    ((("198.18.1.20", 5432), DB, ("db.example", 5432)), None),  # a name: the route decides
    ((("198.18.1.20", 5432), DB, ("198.18.1.20", 5432)), None),
    ((("127.0.0.1", 6432), DB, ("127.0.0.1", 6432)), None),  # the cluster names loopback explicitly
    ((("198.18.1.20", 5432), DB, ("198.18.2.9", 5432)), NOT_IN_CLUSTER),  # another plane's address
    ((("198.18.1.20", 5432), DB, ("127.0.0.1", 22)), NOT_IN_CLUSTER),
    ((("198.18.1.20", 5432), DB, ("198.18.1.20", 22)), NOT_IN_CLUSTER),  # an endpoint is address and port
    ((("198.18.1.20", 5432), DB, ("::ffff:198.18.1.20", 5432)), None),
    ((("198.18.1.20", 15006), DB, None), OWN_PORT),
]


@pytest.mark.parametrize(("args", "refusal"), CASES)
def test_connect_target_table(args, refusal) -> None:
    target, cluster, authority = args
    assert connect_refusal(target, cluster, authority, LISTEN, NODE.__contains__) == refusal


def test_node_address_probe() -> None:
    assert is_node_address("127.0.0.1") and is_node_address("::ffff:127.0.0.1")
    assert not is_node_address("192.0.2.77")  # TEST-NET-1: nobody's address
    assert not is_node_address("db.example")
