"""Where a relayed TCP connection goes (passthrough.py): the chain's cluster's endpoint, or the original
destination.

A chain naming a cluster that is not ORIGINAL_DST gets one of its endpoints, holding one of the cluster's
connection units (the caller gives it back and reports the outcome when the relay ends) and counted started on
the endpoint's load balancer. No chain, a chain without a cluster, or an ORIGINAL_DST cluster: the original
destination, unless that is one of the proxy's own ports (not intercepted: it would loop back into us).
"""

from __future__ import annotations

from collections.abc import Container
from typing import TYPE_CHECKING, NamedTuple

from planemesh.agent.proxy.circuit import CONNECTIONS
from planemesh.model.config import ClusterKind

if TYPE_CHECKING:
    from planemesh.agent.proxy.balancer import Balancer
    from planemesh.agent.proxy.circuit import CircuitBreaker
    from planemesh.agent.proxy.sni_routing import PassthroughChain
    from planemesh.model.config import Cluster, Endpoint

NO_UPSTREAM = "no_upstream"  # the cluster does not exist (Envoy closes: NC), its breaker is full, or no endpoint
LOOP = "loop"  # the original destination is one of our own listening ports


class Upstream(NamedTuple):
    cluster: Cluster | None
    endpoint: Endpoint | None  # None: the original destination
    breaker: CircuitBreaker | None  # holds one CONNECTIONS unit when endpoint is set
    address: tuple[str, int]


def pick_upstream(balancer: Balancer, chain: PassthroughChain | None, dst: tuple[str, int],
                  own_ports: Container[int]) -> Upstream | str:  # fmt: skip
    """The connection's upstream, or why it has none (NO_UPSTREAM, LOOP): the caller refuses it."""
    cluster = None
    if chain is not None and chain.action is not None:
        cluster = balancer.cluster_for(chain.action)
        if cluster is None:
            return NO_UPSTREAM
    if cluster is None or cluster.kind is ClusterKind.ORIGINAL_DST:
        return LOOP if dst[1] in own_ports else Upstream(cluster, None, None, dst)
    breaker = balancer.breaker(cluster)
    if not breaker.try_acquire(CONNECTIONS):
        return NO_UPSTREAM
    ep = balancer.pick_endpoint(cluster)
    if ep is None:
        breaker.release(CONNECTIONS)
        return NO_UPSTREAM
    balancer.lb(cluster).started(ep)
    return Upstream(cluster, ep, breaker, (ep.address, ep.port))
