"""Route selection for one plane, pure and table-tested.

listener for (plane, original destination port[, prefix]) -> route config -> virtual host (by authority)
-> first matching route -> what to do (forward to a cluster or the original destination, redirect, or a
direct response). Everything is compiled once per snapshot so a request costs a few dict lookups.
Load balancing and resilience live elsewhere (balancer.py) and build on `RouteResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from planemesh.agent.proxy.filters import FilterChain
from planemesh.agent.proxy.local_inbound import chained, tighter_timeout
from planemesh.agent.proxy.pod_table import PodTable
from planemesh.model.config import (
    DEFAULT_TRACE,
    DEFAULT_UPGRADES,
    Cluster,
    DirectResponse,
    HeaderMatch,
    HttpFilter,
    Listener,
    ListenerProtocol,
    QueryMatch,
    Redirect,
    Route,
    RouteConfig,
    Snapshot,
    UpgradeConfig,
    VirtualHost,
)
from planemesh.model.ip import IPAddress, IPNetwork
from planemesh.model.safe_regex import Regex, compile_regex

if TYPE_CHECKING:
    from planemesh.agent.proxy.circuit import CircuitBreaker
    from planemesh.model.config import RetryPolicy

# Headers a route may look at, lower-case name -> value (repeated headers joined with ",").
Headers = Mapping[str, str]


def _compile_regex(pattern: str | None) -> Regex | None:
    """RE2, compiled once per snapshot (Envoy's safe_regex: linear time, full match of the value)."""
    return compile_regex(pattern) if pattern is not None else None


class CompiledHeaderMatch:
    __slots__ = ("exact", "invert", "name", "prefix", "present", "regex")

    def __init__(self, spec: HeaderMatch) -> None:
        self.name = spec.name.lower()
        self.exact = spec.exact
        self.prefix = spec.prefix
        self.regex = _compile_regex(spec.regex)
        self.present = spec.present
        self.invert = spec.invert

    def matches(self, headers: Headers) -> bool:
        value = headers.get(self.name)
        if self.present is not None:
            ok = (value is not None) == self.present
        elif value is None:
            ok = False
        elif self.exact is not None:
            ok = value == self.exact
        elif self.prefix is not None:
            ok = value.startswith(self.prefix)
        elif self.regex is not None:
            ok = self.regex.fullmatch(value)
        else:  # a bare name: the header must be present
            ok = True
        return ok != self.invert


class CompiledQueryMatch:
    __slots__ = ("exact", "name", "present", "regex")

    def __init__(self, spec: QueryMatch) -> None:
        self.name = spec.name
        self.exact = spec.exact
        self.regex = _compile_regex(spec.regex)
        self.present = spec.present

    def matches(self, query: Mapping[str, str]) -> bool:
        value = query.get(self.name)
        if self.present is not None:
            return (value is not None) == self.present
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        if self.regex is not None:
            return self.regex.fullmatch(value)
        return True


def parse_query(query: str) -> dict[str, str]:
    """First value of each query parameter, undecoded except '+' kept as is (Envoy matches raw values)."""
    out: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        out.setdefault(name, value)
    return out


class CompiledRoute:
    __slots__ = ("exact_path", "headers", "prefix", "query", "regex", "route")

    def __init__(self, route: Route) -> None:
        m = route.match
        self.route = route
        self.exact_path = m.path
        # A CONNECT request has no path: its routes (connect_matcher) match on headers and query only.
        self.prefix = m.prefix if m.path is None and m.regex is None and not m.connect else None
        self.regex = _compile_regex(m.regex)
        self.headers = tuple(CompiledHeaderMatch(h) for h in m.headers)
        self.query = tuple(CompiledQueryMatch(q) for q in m.query)

    def matches(self, path: str, query: str, headers: Callable[[], Headers]) -> bool:
        if self.exact_path is not None:
            if path != self.exact_path:
                return False
        elif self.regex is not None:
            if not self.regex.fullmatch(path):
                return False
        elif self.prefix is not None and not path.startswith(self.prefix):
            return False
        if self.headers:
            hdrs = headers()
            for h in self.headers:
                if not h.matches(hdrs):
                    return False
        if self.query:
            params = parse_query(query)
            for q in self.query:
                if not q.matches(params):
                    return False
        return True


def _first_segment(path: str) -> str | None:
    """`/a/b` -> `a`; None for targets that do not start with `/` (`*`, garbage)."""
    return path[1:].split("/", 1)[0] if path.startswith("/") else None


def _route_segment(route: CompiledRoute) -> str | None:
    """The first path segment every path this route can match starts with; None when not fixed."""
    if route.exact_path is not None:
        return _first_segment(route.exact_path)
    prefix = route.prefix
    if prefix is not None and prefix.startswith("/") and "/" in prefix[1:]:
        return prefix[1:].split("/", 1)[0]
    return None


class Reuse:
    """What a new PlaneRouter takes over from the previous one: compiled virtual hosts and routes whose config
    objects are the very same (the xDS translation and the worker channel keep unchanged ones identical), so a
    one-route change in 10,000 routes compiles one route and re-indexes one virtual host. A changed virtual
    host looks for its unchanged routes in its previous version of the same name (a route moved to another
    virtual host is compiled again). Counts for tests."""

    def __init__(self, previous: PlaneRouter | None = None) -> None:
        self.vhosts: dict[int, CompiledVirtualHost] = {}
        self._by_name: dict[str, CompiledVirtualHost] = {}  # a changed virtual host finds its old routes here
        self.routes: dict[int, CompiledRoute] = {}  # filled per changed virtual host, from its namesake
        if previous is not None:
            for cvh in previous.compiled_vhosts():
                self.vhosts[id(cvh.vhost)] = cvh  # cvh holds its vhost, so the id cannot be recycled meanwhile
                self._by_name.setdefault(cvh.name, cvh)
        self.vhosts_compiled = self.vhosts_reused = self.routes_compiled = self.routes_reused = 0

    def vhost(self, vhost: VirtualHost) -> CompiledVirtualHost:
        found = self.vhosts.get(id(vhost))
        if found is not None and found.vhost is vhost:
            self.vhosts_reused += 1
            return found
        self.vhosts_compiled += 1
        old = self._by_name.pop(vhost.name, None)  # its previous version: only its routes are looked at
        if old is not None:
            for cr in (*old.routes, *old.connect_routes):
                self.routes[id(cr.route)] = cr
        found = self.vhosts[id(vhost)] = CompiledVirtualHost(vhost, self)
        return found

    def route(self, route: Route) -> CompiledRoute:
        found = self.routes.get(id(route))
        if found is not None and found.route is route:
            self.routes_reused += 1
            return found
        self.routes_compiled += 1
        found = self.routes[id(route)] = CompiledRoute(route)
        return found


class CompiledVirtualHost:
    """First matching route wins. Routes are indexed by their fixed first path segment so a request only
    tries the routes that can match it (in declaration order): thousands of routes stay cheap."""

    __slots__ = ("by_segment", "cacheable", "connect_routes", "name", "routes", "unindexed", "vhost")
    MAX_UNINDEXED = 64  # beyond this many catch-all routes the index would cost more than it saves

    def __init__(self, vhost: VirtualHost, reuse: Reuse | None = None) -> None:
        self.vhost = vhost
        self.name = vhost.name
        compiled = reuse.route if reuse is not None else CompiledRoute
        self.routes = tuple(compiled(r) for r in vhost.routes if not r.match.connect)
        self.connect_routes = tuple(compiled(r) for r in vhost.routes if r.match.connect)
        # Path-only matching: the answer for (authority, target) never changes within a snapshot.
        self.cacheable = all(not r.headers and not r.query for r in self.routes)
        buckets: dict[str, list[int]] = {}
        unindexed: list[int] = []
        for i, route in enumerate(self.routes):
            seg = _route_segment(route)
            if seg is None:
                unindexed.append(i)
            else:
                buckets.setdefault(seg, []).append(i)
        self.unindexed = tuple(self.routes[i] for i in unindexed)
        self.by_segment: dict[str, tuple[CompiledRoute, ...]] | None = None
        if len(self.routes) > 8 and len(unindexed) <= self.MAX_UNINDEXED:
            self.by_segment = {seg: tuple(self.routes[i] for i in sorted(idx + unindexed))
                               for seg, idx in buckets.items()}

    def select(self, path: str, query: str, headers: Callable[[], Headers], connect: bool = False) -> Route | None:
        candidates: tuple[CompiledRoute, ...] = self.routes
        if connect:
            candidates = self.connect_routes
        elif self.by_segment is not None:
            seg = _first_segment(path)
            if seg is not None:
                candidates = self.by_segment.get(seg, self.unindexed)
        for route in candidates:
            if route.matches(path, query, headers):
                return route.route
        return None


def _strip_port(authority: str) -> str:
    if authority.startswith("["):  # [v6]:port
        end = authority.find("]")
        return authority[: end + 1] if end > 0 else authority
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else authority


class CompiledRouteConfig:
    """Virtual host lookup as Envoy does it: exact, then longest `*.suffix`, then longest `prefix.*`, then `*`."""

    __slots__ = (
        "_cache", "_chain", "default", "exact", "http_filters", "local_client", "name", "prefixes", "results",
        "suffixes", "trace", "upgrades",
    )  # fmt: skip

    def __init__(
        self,
        rc: RouteConfig,
        http_filters: tuple[HttpFilter, ...] = (),
        upgrades: tuple[UpgradeConfig, ...] = DEFAULT_UPGRADES,
        reuse: Reuse | None = None,
        trace: float | None = DEFAULT_TRACE,
    ) -> None:
        self.name = rc.name
        self.trace = trace  # the listener's trace_sampling (request_head.py, tracing.py); None: no tracing
        self.http_filters = http_filters  # the listener's; a listener with filters gets its own instance
        self.upgrades = {u.upgrade_type: u.enabled for u in upgrades}  # the listener's
        self._chain: FilterChain | None = None
        # A source-scoped listener's (a local client pod's outbound one): its requests may meet a local server
        # pod's inbound stage at their endpoint (PlaneRouter.local_inbound). Set by the PlaneRouter.
        self.local_client = False
        self.exact: dict[str, CompiledVirtualHost] = {}
        suffixes: list[tuple[str, CompiledVirtualHost]] = []
        prefixes: list[tuple[str, CompiledVirtualHost]] = []
        self.default: CompiledVirtualHost | None = None
        for vh in rc.virtual_hosts:
            cvh = reuse.vhost(vh) if reuse is not None else CompiledVirtualHost(vh)
            for domain in vh.domains:
                d = domain.lower()
                if d == "*":
                    self.default = self.default or cvh
                elif d.startswith("*"):
                    suffixes.append((d[1:], cvh))
                elif d.endswith("*"):
                    prefixes.append((d[:-1], cvh))
                else:
                    self.exact.setdefault(d, cvh)
        # Longest wildcard first; stable sort keeps declaration order among equals.
        self.suffixes = sorted(suffixes, key=lambda item: -len(item[0]))
        self.prefixes = sorted(prefixes, key=lambda item: -len(item[0]))
        self._cache: dict[str, CompiledVirtualHost | None] = {}
        self.results: dict[tuple[str, bytes], RouteResult] = {}  # filled by PlaneRouter.route_request

    def upgrade_allowed(self, route: Route | None, upgrade_type: str) -> bool:
        """Envoy's rule: the route's setting for this upgrade type wins, else the listener's, else refused."""
        action = route.action if route is not None else None
        if action is not None:
            for uc in action.upgrades:
                if uc.upgrade_type == upgrade_type:
                    return uc.enabled
        return self.upgrades.get(upgrade_type, False)

    def filter_chain(self, clock: Callable[[], float]) -> FilterChain:
        """The listener's filters with their state (rate limit bucket), made on first use."""
        if self._chain is None:
            self._chain = FilterChain(self.http_filters, clock)
        return self._chain

    def virtual_host(self, authority: str) -> CompiledVirtualHost | None:
        try:
            return self._cache[authority]
        except KeyError:
            pass
        found = self._lookup(authority.lower())
        if len(self._cache) < 4096:  # bounded: authorities come from clients
            self._cache[authority] = found
        return found

    def _lookup(self, authority: str) -> CompiledVirtualHost | None:
        for host in (authority, _strip_port(authority)):
            vh = self.exact.get(host)
            if vh is not None:
                return vh
            for suffix, cvh in self.suffixes:
                if host.endswith(suffix) and len(host) > len(suffix):
                    return cvh
            for prefix, cvh in self.prefixes:
                if host.startswith(prefix) and len(host) > len(prefix):
                    return cvh
        return self.default


@dataclass(frozen=True, slots=True)
class RouteResult:
    """The outcome of routing one request: forward (to `cluster`, or the original destination when it is
    None and not `cluster_missing`), redirect, direct response, or none of them (no route: 404 NR)."""

    route: Route | None
    vhost: str = ""
    cluster: Cluster | None = None
    forward: bool = False
    redirect: Redirect | None = None
    direct: DirectResponse | None = None
    weighted: bool = False  # the balancer picks the cluster per request
    cluster_missing: bool = False  # the route names a cluster the snapshot does not have
    timeout_s: float = 0.0  # route timeout, else the plane's request timeout; 0: none
    connect_timeout_s: float = 5.0
    # A local server pod's inbound cluster breaker whose REQUESTS unit the request holds (pipeline.local_inbound)
    inbound_hold: CircuitBreaker | None = None
    inbound_retry: RetryPolicy | None = None  # that server's route's retry policy (its sidecar's retries)


NO_ROUTE = RouteResult(route=None)


class PlaneRouter:
    """One plane's routing table, compiled from a Snapshot. Immutable after construction."""

    def __init__(self, snapshot: Snapshot, plane: str, previous: PlaneRouter | None = None) -> None:
        self.snapshot = snapshot
        self.plane = snapshot.plane(plane)
        self.reuse = Reuse(previous)  # the previous router's compiled matchers whose config did not change
        self._all: list[CompiledRouteConfig] = []
        self._configs: dict[tuple[str | None, tuple[UpgradeConfig, ...], float | None], CompiledRouteConfig] = {}
        self._by_port: dict[int, list[tuple[tuple[IPNetwork, ...], tuple[IPNetwork, ...], CompiledRouteConfig]]] = {}
        self._tls: set[int] = set()  # id() of the route configs of TLS-terminating listeners (a permissive twin)
        self._inbound_at: dict[tuple[str, int], CompiledRouteConfig | None] = {}  # endpoint -> local inbound
        self._chained: dict[tuple[int, int], tuple] = {}  # (client's result, server's result) -> chained_result
        self._chained_routes: dict[tuple[int, int], Route] = {}  # (client's route, server's route) -> chained
        self.pods = PodTable()  # the node's pod table: a local workload's address -> its SPIFFE ID
        for lsn in snapshot.listeners_of(plane):
            if lsn.protocol is not ListenerProtocol.HTTP:
                self.pods.add(lsn)
                continue
            crc = self._compiled(lsn)
            self.pods.add(lsn, crc)
            if lsn.tls is not None:
                self._tls.add(id(crc))
            if lsn.sources:
                crc.local_client = True
            self._by_port.setdefault(lsn.port, []).append((lsn.prefixes, lsn.sources, crc))
        # A source-scoped listener (a local workload's outbound one) before any other: the client's routing
        # wins over the destination's inbound chain, as drop_shadowed_inbound decides for one proxy. Then
        # most specific prefixes first; listeners without prefixes catch the rest.
        for entries in self._by_port.values():
            entries.sort(key=lambda e: (not e[1], -max((p.prefixlen for p in e[0]), default=-1)))
        self.original_destination = self._compiled(None)
        self.reuse.vhosts, self.reuse.routes = {}, {}  # only the counts stay: the old table is not kept alive

    def compiled_vhosts(self) -> list[CompiledVirtualHost]:
        """Every compiled virtual host of this router (each once)."""
        seen: dict[int, CompiledVirtualHost] = {}
        for crc in self._all:
            for cvh in (*crc.exact.values(), *(v for _, v in crc.suffixes), *(v for _, v in crc.prefixes),
                        crc.default):  # fmt: skip
                if cvh is not None:
                    seen[id(cvh)] = cvh
        return list(seen.values())

    def _compiled(self, lsn: Listener | None) -> CompiledRouteConfig:
        name = lsn.route_config if lsn is not None else None
        upgrades = lsn.upgrades if lsn is not None else DEFAULT_UPGRADES
        trace = lsn.trace_sampling if lsn is not None else DEFAULT_TRACE
        if lsn is not None and lsn.http_filters:  # filter state (buckets) belongs to the listener
            rc = self.snapshot.route_config(name)
            crc = CompiledRouteConfig(rc, lsn.http_filters, upgrades, self.reuse, trace)
            self._all.append(crc)
            return crc
        crc = self._configs.get((name, upgrades, trace))
        if crc is None:
            rc = self.snapshot.route_config(name)
            crc = self._configs[name, upgrades, trace] = CompiledRouteConfig(rc, (), upgrades, self.reuse, trace)
            self._all.append(crc)
        return crc

    def route_config(
        self, dst_ip: str, dst_port: int, src_ip: str = "", tls: bool = False
    ) -> CompiledRouteConfig | None:
        """The route config of the listener for this original destination (and source, for listeners scoped to
        a local workload's addresses); None: no listener declared. `tls`: the connection's TLS was terminated;
        of a permissive port's twins (same destination) the TLS one serves it, the plaintext one the others
        (Envoy's transport_protocol match, after the prefix match)."""
        entries = self._by_port.get(dst_port)
        if not entries:
            return None
        if len(entries) == 1 and not entries[0][0] and not entries[0][1]:
            return entries[0][2]
        ip = parse_ip(dst_ip)
        src = None
        for i, (prefixes, sources, crc) in enumerate(entries):
            if sources:
                if src is None:
                    src = parse_ip(src_ip) if src_ip else False
                if src is False or not any(src.version == p.version and src in p for p in sources):
                    continue
            if not prefixes or any(ip.version == p.version and ip in p for p in prefixes):
                # A local client's own listener first; a local server's inbound chain then applies at the
                # request's endpoint (local_inbound), as the server's sidecar would after the client's.
                return self._twin(entries, i, tls) if self._tls else crc
        return None

    def local_inbound(self, crc: CompiledRouteConfig, ip: str, port: int) -> CompiledRouteConfig | None:
        """The inbound route config of a local workload at endpoint (ip, port), when `crc` is a local client's
        (source-scoped) one: the server pod's own stage of a local-to-local request (local_inbound.py). None: the
        client is no local workload, or no local workload's inbound listener holds that endpoint."""
        if not crc.local_client:
            return None
        key = (ip, port)
        try:
            inbound = self._inbound_at[key]
        except KeyError:
            inbound = self._inbound_at_endpoint(ip, port)
            if len(self._inbound_at) < 8192:  # bounded: an original destination comes from the client
                self._inbound_at[key] = inbound
        return inbound if inbound is not crc else None

    def principal_of(self, crc: CompiledRouteConfig, peer_ip: str) -> str | None:
        """The SPIFFE ID of the local workload at `peer_ip`, when `crc` is a local client's (source-scoped)
        listener the connection was chosen by (its source address is that workload's): what a local server
        pod's inbound stage sees as the client's principal (ztunnel's pod table). Never from a header."""
        return self.pods.principal(peer_ip) if crc.local_client else None

    def local_xfcc_at(self, crc: CompiledRouteConfig, addr: tuple[str, int], client: str | None) -> bytes | None:
        """The x-forwarded-client-cert of the local server stage at endpoint `addr` (PodTable.xfcc)."""
        if client is None or not self.pods.sets_xfcc():
            return None
        return self.pods.xfcc(self.local_inbound(crc, *addr), client)

    def _inbound_at_endpoint(self, ip: str, port: int) -> CompiledRouteConfig | None:
        addr = parse_ip(ip)
        for prefixes, sources, inbound in self._by_port.get(port, ()):  # most specific destination prefix first
            if not sources and prefixes and any(addr.version == p.version and addr in p for p in prefixes):
                return inbound
        return None

    def chained_result(self, first: RouteResult, second: RouteResult, hold: CircuitBreaker | None) -> RouteResult:
        """The client's result `first` with the server's inbound result `second` chained in (local_inbound.py):
        the chained route, the tighter timeout, the server's inbound cluster `hold`. Made once per pair: the
        entry keeps the pair alive, so their ids stay theirs while it is cached."""
        key = (id(first), id(second))
        entry = self._chained.get(key)
        if entry is not None and entry[0] is first and entry[1] is second and entry[2] is hold:
            return entry[3]
        assert first.route is not None and second.route is not None  # forwarded results have their routes
        pair = (id(first.route), id(second.route))  # routes live as long as the snapshot: their ids are stable
        route = self._chained_routes.get(pair)
        if route is None:
            route = self._chained_routes[pair] = chained(first.route, second.route)
        timeout_s = tighter_timeout(first.timeout_s, second.timeout_s)
        result = RouteResult(route, first.vhost, first.cluster, first.forward, first.redirect, first.direct,
                             first.weighted, first.cluster_missing, timeout_s, first.connect_timeout_s, hold,
                             second.route.action.retry if second.route.action is not None else None)
        if len(self._chained) < 8192:  # bounded: a result not cached by route_request is new per request
            self._chained[key] = (first, second, hold, result)
        return result

    def _twin(self, entries: list, i: int, tls: bool) -> CompiledRouteConfig:
        """entries[i], or its TLS / plaintext twin (same prefixes and sources) that fits the connection."""
        prefixes, sources, crc = entries[i]
        if (id(crc) in self._tls) is tls:
            return crc
        for other_prefixes, other_sources, other in entries[i + 1 :]:
            if (other_prefixes, other_sources) == (prefixes, sources) and (id(other) in self._tls) is tls:
                return other
        return crc

    def route(
        self, crc: CompiledRouteConfig, authority: str, path: str, query: str, headers: Callable[[], Headers],
        connect: bool = False,
    ) -> RouteResult:
        vh = crc.virtual_host(authority)
        if vh is None:
            return NO_ROUTE
        route = vh.select(path, query, headers, connect)
        if route is None:
            return NO_ROUTE
        if route.direct_response is not None:
            return RouteResult(route=route, vhost=vh.name, direct=route.direct_response)
        if route.redirect is not None:
            return RouteResult(route=route, vhost=vh.name, redirect=route.redirect)
        act = route.action
        if act is None:
            return NO_ROUTE
        name = act.cluster or (act.weighted[0].name if act.weighted else None)
        cluster = self.snapshot.clusters.get(name) if name else None
        sla = self.plane.sla
        connect = cluster.connect_timeout_s if cluster is not None else None
        return RouteResult(
            route=route, vhost=vh.name, cluster=cluster, forward=True, weighted=bool(act.weighted),
            cluster_missing=name is not None and cluster is None,
            timeout_s=act.timeout_s if act.timeout_s is not None else sla.request_timeout_s,
            connect_timeout_s=connect if connect is not None else sla.connect_timeout_s,
        )

    def route_request(
        self, crc: CompiledRouteConfig, authority: str, target: bytes, headers: Callable[[], Headers],
        connect: bool = False,
    ) -> RouteResult:
        """route() for a raw request-target, memoised when the answer cannot depend on headers or query.
        A CONNECT request (authority-form target) is routed by its target among the connect_matcher routes."""
        if connect:
            return self.route(crc, target.decode("latin-1"), "", "", headers, connect=True)
        key = (authority, target)
        cache = crc.results
        result = cache.get(key)
        if result is not None:
            return result
        path, query = split_target(target.decode("latin-1"))
        result = self.route(crc, authority, path, query, headers)
        vh = crc.virtual_host(authority)
        if (vh is None or vh.cacheable) and len(cache) < 8192:  # bounded: targets come from clients
            cache[key] = result
        return result


def parse_ip(text: str) -> IPAddress:
    """An address as text (a scope id dropped, `::ffff:a.b.c.d` as the v4 address) as an IPAddress."""
    ip = IPAddress(text.split("%", 1)[0])
    return ip.ipv4() if ip.version == 6 and ip.is_ipv4_mapped() else ip


def split_target(target: str) -> tuple[str, str]:
    """Request-target -> (path, query). Absolute-form targets (`http://host/p`) keep only the path."""
    if target.startswith(("http://", "https://")):
        slash = target.find("/", target.find("//") + 2)
        target = target[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")
    return path, query


def redirect_location(redirect: Redirect, scheme: str, authority: str, path: str, query: str) -> str:
    new_path = redirect.path if redirect.path is not None else path + (f"?{query}" if query else "")
    return f"{redirect.scheme or scheme}://{redirect.host or authority}{new_path}"
