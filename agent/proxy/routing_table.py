"""One snapshot's routing state for a plane: the compiled router, the balancer (lb, breakers, outlier state),
the SNI chains, the per-route rate limit buckets. PlaneProxy.update() swaps it as a whole."""

from __future__ import annotations

import time
from collections.abc import Callable

from planemesh.agent.proxy.balancer import Balancer
from planemesh.agent.proxy.filters import LocalRateLimiter
from planemesh.agent.proxy.routing import PlaneRouter
from planemesh.agent.proxy.sni_routing import SniRoutes
from planemesh.agent.proxy.tls import TlsRoutes, plane_tcp_chains, unguarded_twins
from planemesh.model.config import Route, Snapshot


class RoutingTable:
    """Everything a request needs from one snapshot; swapped as a whole by PlaneProxy.update()."""

    __slots__ = ("balancer", "clock", "route_limiters", "router", "snapshot", "sni", "tls")

    def __init__(
        self,
        snapshot: Snapshot,
        plane: str,
        clock: Callable[[], float] = time.monotonic,
        tls_cache: dict | None = None,
        previous: RoutingTable | None = None,
    ) -> None:
        """`previous`: the table this one replaces; its compiled routes whose config is unchanged are reused."""
        self.snapshot = snapshot
        self.tls = TlsRoutes(snapshot, plane, {} if tls_cache is None else tls_cache)  # TLS ports (tls.py)
        self.clock = clock
        self.route_limiters: dict[int, LocalRateLimiter] = {}  # id(route) -> its bucket (routes live as long)
        self.router = PlaneRouter(snapshot, plane, previous.router if previous is not None else None)
        # passthrough chains (sniff listener), as the plane's mTLS mode makes them (tls.py plane_tcp_chains)
        chains = plane_tcp_chains(snapshot.listeners_of(plane), self.tls.sla)
        self.sni = SniRoutes(chains, snapshot.clusters, unguarded_twins(chains, self.tls.sla))
        self.balancer = Balancer(snapshot, clock=clock)  # outlier ejection follows the proxy's clock

    def route_limiter(self, route: Route) -> LocalRateLimiter:
        """The token bucket of a route with a per-route local rate limit, made on its first request."""
        limiter = self.route_limiters.get(id(route))
        if limiter is None:
            assert route.rate_limit is not None
            limiter = self.route_limiters[id(route)] = LocalRateLimiter(route.rate_limit, self.clock)
        return limiter
