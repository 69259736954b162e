"""Where a CONNECT tunnel may go: the decision, table-tested (tests/unit/test_connect_target.py).

A CONNECT's authority comes from the client, so it never chooses the tunnel's target by itself (issue 11,
finding 5: tunnels reached the node's loopback, `localhost`, the node's own addresses and other planes):
- a route to the original destination (no cluster, or an ORIGINAL_DST cluster): the tunnel goes where the
  client's packet was addressed (the intercepted connection's original destination, which the plane's policy
  already allowed), as Envoy's ORIGINAL_DST does; never to the node's loopback or one of its own addresses,
  which only a proxy on the node could reach for the client;
- a route to a cluster: an endpoint of that cluster, picked by its load balancer (Envoy ignores the
  authority there too); an authority naming an IP address that is not an endpoint of the cluster is refused
  rather than silently sent elsewhere. A cluster may name loopback or node addresses: the operator chose them.
Refusals are 403 (Envoy answers a CONNECT its configuration does not allow with 403); an authority that is
not `host:port` is a 400 before routing (downstream.py).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Collection

from planemesh.model.config import Cluster, ClusterKind

OWN_PORT = b"CONNECT to the proxy's own port is not allowed\n"
LOOPBACK = b"CONNECT to the node's loopback is not allowed\n"
NODE_ADDRESS = b"CONNECT to the node's own addresses is not allowed\n"
NOT_IN_CLUSTER = b"CONNECT target is not an endpoint of the route's cluster\n"


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_node_address(host: str) -> bool:
    """Whether `host` is an address of this network namespace (the node): binding to it succeeds only then.
    Two syscalls, once per CONNECT to an original destination. Fails closed: any other error counts as ours."""
    ip = _ip(host)
    if ip is None:
        return False
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL
    return True


def connect_refusal(
    target: tuple[str, int],
    cluster: Cluster | None,
    authority: tuple[str, int] | None,
    listen_ports: Collection[int],
    node_address: Callable[[str], bool] = is_node_address,
) -> bytes | None:
    """Why a CONNECT must not open a tunnel to `target` (the answer body of a 403), None when it may.
    `target` is the original destination for an original-destination route, else the endpoint the
    cluster's balancer picked; `authority` is what the client asked for."""
    if target[1] in listen_ports:
        return OWN_PORT
    if cluster is None or cluster.kind is ClusterKind.ORIGINAL_DST:
        ip = _ip(target[0])
        if ip is None or ip.is_loopback or ip.is_unspecified:
            return LOOPBACK
        if node_address(str(ip)):
            return NODE_ADDRESS
        return None
    if authority is not None:
        asked = _ip(authority[0])
        if asked is not None and not any(
            _ip(ep.address) == asked and ep.port == authority[1] for ep in cluster.endpoints
        ):
            return NOT_IN_CLUSTER
    return None
