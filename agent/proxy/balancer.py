"""Picking an upstream for a routed request: weighted clusters, then an endpoint by the cluster's policy
(lb.py), skipping endpoints outlier detection has ejected (outlier.py), with per-cluster circuit breakers
(circuit.py).

All of this state lives here, per snapshot, so a new snapshot starts fresh; requests in flight keep the
objects they took (their breaker and lb), so their releases land where they were counted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from collections.abc import Callable, Mapping

from planemesh.agent.proxy.circuit import CircuitBreaker
from planemesh.agent.proxy.dns import DnsRefresh
from planemesh.agent.proxy.lb import ClusterLb, hash64, smooth_weighted_sequence
from planemesh.agent.proxy.outlier import OutlierDetector
from planemesh.model.config import Cluster, ClusterKind, Endpoint, HashPolicy, LbPolicy, RouteAction, Snapshot


def normalise_ip(address: str) -> str:
    """`::ffff:a.b.c.d` (how a dual-stack socket shows v4) -> `a.b.c.d`; scope ids and others unchanged."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def request_hash(
    policies: tuple[HashPolicy, ...], headers: Callable[[], Mapping[str, str]], source_ip: str
) -> int | None:
    """The hash key of a request under a route's hash policies (the first that applies), None: no key."""
    for policy in policies:
        if policy.header is not None:
            value = headers().get(policy.header.lower())
            if value is not None:
                return hash64(value.encode("latin-1", "replace"))
        elif policy.source_ip:
            return hash64(normalise_ip(source_ip).encode())
    return None


class Balancer:
    def __init__(
        self, snapshot: Snapshot, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None
    ) -> None:
        self._snapshot = snapshot
        self._clock = clock
        self._rng = rng or random.Random()
        self._weighted: dict[int, list] = {}  # id(route action) -> [cluster index order, cursor]
        self._lbs: dict[str, ClusterLb] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._outliers: dict[str, OutlierDetector] = {}
        # DNS clusters' endpoints (agent/proxy/dns.py), shared across snapshots; set by the PlaneProxy
        self.dns: DnsRefresh | None = None
        self._resolved: dict[str, tuple[Cluster, int, Cluster]] = {}  # name -> (config, generation, resolved)

    def _effective(self, cluster: Cluster) -> Cluster:
        """A DNS cluster with the endpoints its hosts resolve to now (the same object while they do not change,
        so its lb keeps its state); any other cluster as it is."""
        if cluster.dns is None or self.dns is None:
            return cluster
        got = self.dns.endpoints(cluster.name)
        if got is None:
            return cluster
        eps, gen = got
        hit = self._resolved.get(cluster.name)
        if hit is not None and hit[0] is cluster and hit[1] == gen:
            return hit[2]
        resolved = dataclasses.replace(cluster, endpoints=eps)
        self._resolved[cluster.name] = (cluster, gen, resolved)
        detector = self._outliers.get(cluster.name)
        if detector is not None:  # max_ejection_percent counts the hosts the name resolves to now
            detector.host_count = max(1, sum(1 for e in eps if e.healthy))
        return resolved

    def cluster_for(self, action: RouteAction) -> Cluster | None:
        """The cluster of a route action; weighted clusters follow a smooth weighted sequence (exact shares
        over every cycle, interleaved: 90/10 sends every tenth request to the 10, not ten in a row)."""
        if action.cluster or not action.weighted:
            return self._snapshot.clusters.get(action.cluster) if action.cluster else None
        key = id(action)
        state = self._weighted.get(key)
        if state is None:
            weights = [max(0, w.weight) for w in action.weighted]
            if not any(weights):
                return self._snapshot.clusters.get(action.weighted[0].name)
            divisor = functools.reduce(math.gcd, [w for w in weights if w])
            live = [i for i, w in enumerate(weights) if w]
            order = smooth_weighted_sequence([weights[i] // divisor for i in live])
            state = self._weighted[key] = [[live[i] for i in order], 0]
        order, n = state
        state[1] = (n + 1) % len(order)
        return self._snapshot.clusters.get(action.weighted[order[n]].name)

    def lb(self, cluster: Cluster) -> ClusterLb:
        if cluster.dns is not None:  # only a DNS cluster's endpoints change under the same config
            cluster = self._effective(cluster)
        found = self._lbs.get(cluster.name)
        if found is None or found.cluster is not cluster:
            found = self._lbs[cluster.name] = ClusterLb(cluster, self._rng)
        return found

    def breaker(self, cluster: Cluster) -> CircuitBreaker:
        found = self._breakers.get(cluster.name)
        if found is None:
            found = self._breakers[cluster.name] = CircuitBreaker(cluster.circuit_breakers)
        return found

    def outlier(self, cluster: Cluster) -> OutlierDetector | None:
        if cluster.outlier is None:
            return None
        cluster = self._effective(cluster)
        found = self._outliers.get(cluster.name)
        if found is None:
            found = self._outliers[cluster.name] = OutlierDetector(
                cluster.outlier, sum(1 for e in cluster.endpoints if e.healthy), self._clock
            )
        return found

    def pick_endpoint(self, cluster: Cluster, hash_key: int | None = None) -> Endpoint | None:
        """An endpoint of a STATIC/EDS/DNS cluster (lowest healthy priority, not ejected), None: none available."""
        detector = self.outlier(cluster)
        lb = self.lb(cluster)
        if detector is None:
            return lb.pick(hash_key)
        ep = lb.pick(hash_key, lambda e: not detector.is_ejected(e))
        # Envoy's panic mode in spirit: when every endpoint is ejected, use them anyway rather than fail.
        return ep if ep is not None else lb.pick(hash_key)

    def start_endpoint(self, cluster: Cluster, hash_key: int | None = None) -> Endpoint | None:
        """pick_endpoint, and the attempt on it counted open (until report())."""
        lb = self.lb(cluster)
        ep = lb.pick(hash_key) if cluster.outlier is None else self.pick_endpoint(cluster, hash_key)
        if ep is not None and lb.counts:
            lb.started(ep)
        return ep

    def pick(
        self, cluster: Cluster, original_dst: tuple[str, int], hash_key: int | None = None
    ) -> tuple[str, int] | None:
        """(address, port) to connect to, or None when the cluster has no healthy endpoint."""
        if cluster.kind is ClusterKind.ORIGINAL_DST:
            return normalise_ip(original_dst[0]), original_dst[1]
        ep = self.pick_endpoint(cluster, hash_key)
        return (ep.address, ep.port) if ep is not None else None

    def report(self, cluster: Cluster, ep: Endpoint, status: int) -> None:
        """One attempt on `ep` ended: an HTTP status, or 0 for connect failure/reset/timeout; -1: no outcome
        (the client went away)."""
        if cluster.outlier is None and cluster.lb_policy is not LbPolicy.LEAST_REQUEST:
            return  # nothing keeps count of attempts (ClusterLb.counts) or outcomes (no outlier detection)
        self.lb(cluster).ended(ep)
        if status >= 0:
            detector = self.outlier(cluster)
            if detector is not None:
                detector.report(ep, status)
