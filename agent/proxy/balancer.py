"""Picking an upstream endpoint for a routed request: round robin for now, weighted clusters by weight.

The only mutable routing state (cursors) lives here, per snapshot, so a new snapshot starts fresh.
"""

from __future__ import annotations

from planemesh.agent.config import Cluster, ClusterKind, Endpoint, RouteAction, Snapshot


def normalise_ip(address: str) -> str:
    """`::ffff:a.b.c.d` (how a dual-stack socket shows v4) -> `a.b.c.d`; scope ids and others unchanged."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


class Balancer:
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._cursor: dict[str, int] = {}
        self._weighted_cursor: dict[int, int] = {}
        self._healthy: dict[str, tuple[Endpoint, ...]] = {
            name: tuple(e for e in c.endpoints if e.healthy) for name, c in snapshot.clusters.items()
        }

    def cluster_for(self, action: RouteAction) -> Cluster | None:
        """The cluster of a route action; weighted clusters are spread by a deterministic weighted cursor."""
        if action.cluster or not action.weighted:
            return self._snapshot.clusters.get(action.cluster) if action.cluster else None
        total = sum(w.weight for w in action.weighted)
        if total <= 0:
            return self._snapshot.clusters.get(action.weighted[0].name)
        key = id(action)
        n = self._weighted_cursor.get(key, 0)
        self._weighted_cursor[key] = (n + 1) % total
        for w in action.weighted:
            if n < w.weight:
                return self._snapshot.clusters.get(w.name)
            n -= w.weight
        return None  # unreachable: n < total

    def pick(self, cluster: Cluster, original_dst: tuple[str, int]) -> tuple[str, int] | None:
        """(address, port) to connect to, or None when the cluster has no healthy endpoint."""
        if cluster.kind is ClusterKind.ORIGINAL_DST:
            return normalise_ip(original_dst[0]), original_dst[1]
        endpoints = self._healthy.get(cluster.name) or ()
        if not endpoints:
            return None
        n = self._cursor.get(cluster.name, 0)
        self._cursor[cluster.name] = n + 1
        ep = endpoints[n % len(endpoints)]
        return ep.address, ep.port
