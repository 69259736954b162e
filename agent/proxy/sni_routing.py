"""Which filter chain a passthrough connection belongs to, by destination and TLS SNI (pure, per snapshot).

    routes = SniRoutes(snapshot.listeners_of("oam"))
    chain = routes.select(443, "198.18.1.20", "api.example.com")   # None: the original destination

Envoy's filter_chain_match order, and like Envoy without backtracking (a more specific level that matches
but has no chain for the next level means no chain at all):
1. destination port (the listener's port, or the chain's destination_port);
2. destination address: the longest matching prefix; a chain without prefix_ranges matches any address (/0);
3. transport protocol: chains with transport_protocol "tls" (or terminating TLS) take TLS connections only,
   "raw_buffer" ones the others (Istio's PERMISSIVE pair); then application_protocols: a chain naming a
   protocol the ClientHello offers (Istio's mTLS chain: `istio-peer-exchange`, `istio`) before chains
   without (Istio's chain for applications doing their own TLS). Envoy matches server names before the
   transport; planemesh the other way round, which differs only when an SNI chain's transport does not match;
4. server name: an exact name, then wildcards from the longest suffix to the shortest (`a.b.example.com`
   tries `*.b.example.com`, then `*.example.com`, then `*.com`; `*.example.com` never matches `example.com`),
   then the chains without server_names. A connection without SNI (not TLS, or no extension) only
   matches chains without server_names.
Only tcp_proxy chains (ListenerProtocol.TCP) take part: HTTP chains are served by the L7 proxy. An HTTP chain
with a TCP chain behind it on one destination (an auto-protocol port: xds/translate_capture.py makes it one
sniffed HTTP listener carrying the TCP chain's clusters) has its TCP chain in `behind_http`: the bytes the
sniffer did not find to be HTTP go to that chain's cluster, unless the cluster would pick the original
destination anyway and originates no TLS (ebpf/policy.py `tcp_handling`, the kernel bypass's own rule).

Chains with `sources` (a local workload's outbound chains: agent/workloads/merge.py) take part for connections
from those addresses only, and at an equal destination prefix they win over chains without sources: the
connection gets its source's own chains, as its sidecar would have chosen them (ebpf/policy.py makes the kernel
send it here by the same rule).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from planemesh.agent.lazy_modules import load
from planemesh.agent.proxy.routing import parse_ip
from planemesh.agent.rbac import RbacFilter
from planemesh.model.config import Cluster, Listener, ListenerProtocol, RouteAction
from planemesh.model.ip import IPAddress, IPNetwork
from planemesh.model.server_names import MAX_SERVER_NAME, server_name_error  # noqa: F401  (re-exported)
from planemesh.model.tls_config import TlsContext


def candidate_names(sni: str) -> Iterable[str]:
    """`sni` itself, then its wildcards from the most to the least specific."""
    yield sni
    dot = sni.find(".")
    while dot >= 0:
        yield "*" + sni[dot:]
        dot = sni.find(".", dot + 1)


@dataclass(frozen=True, slots=True)
class PassthroughChain:
    """A selected tcp_proxy chain. `action` (one per chain and snapshot) feeds Balancer.cluster_for, so
    weighted clusters keep their smooth sequence across connections; None: the original destination."""

    name: str
    action: RouteAction | None
    rbac: tuple[RbacFilter, ...] = ()  # network RBAC, checked per connection (agent/proxy/tcp_authz.py)
    tls: TlsContext | None = None  # terminate TLS, then relay plaintext (agent/proxy/tcp_tls.py)


class _Entry:
    __slots__ = ("alpn", "chain", "names", "prefixes", "sources", "specificity", "transport")

    def __init__(self, lsn: Listener) -> None:
        self.prefixes: tuple[IPNetwork, ...] = lsn.prefixes
        self.sources: tuple[IPNetwork, ...] = lsn.sources
        self.specificity = max((p.prefixlen for p in lsn.prefixes), default=0)
        self.names = frozenset(n.lower() for n in lsn.server_names)
        tcp = lsn.tcp_clusters
        action = None
        if len(tcp) == 1:
            action = RouteAction(cluster=tcp[0].name)
        elif tcp:
            action = RouteAction(weighted=tcp)
        self.chain = PassthroughChain(lsn.name, action, lsn.network_rbac, lsn.tls)  # type: ignore[arg-type]
        # filter_chain_match.transport_protocol; a chain that terminates TLS takes TLS connections only
        self.transport = lsn.transport_protocol or ("tls" if lsn.tls is not None else "")
        self.alpn = frozenset(lsn.application_protocols)

    def applies(self, src: IPAddress | None) -> bool:
        """The chain takes connections from `src` (None: a source no chain is scoped to)."""
        if not self.sources:
            return True
        return src is not None and any(src.version == p.version and src in p for p in self.sources)

    def accepts(self, tls: bool) -> bool:
        return not self.transport or (self.transport == "tls") == tls

    def prefix_len(self, ip: IPAddress) -> int:
        """How specifically this chain matches `ip`: the longest containing prefix, 0 for any, -1 for none."""
        if not self.prefixes:
            return 0
        return max((p.prefixlen for p in self.prefixes if p.version == ip.version and ip in p), default=-1)


class SniRoutes:
    """The tcp_proxy filter chains of one plane, indexed by destination port. Immutable."""

    def __init__(self, listeners: Iterable[Listener], clusters: Mapping[str, Cluster] | None = None,
                 unguarded: frozenset[str] = frozenset()) -> None:  # fmt: skip
        """`clusters`: the snapshot's, to relay the TCP chains behind sniffed HTTP chains (module doc).
        `unguarded`: chains whose TLS does not make their port refuse what no chain takes (a permissive
        plane's mTLS twins, agent/proxy/tls.py plane_tcp_chains: permissive passes the rest as before)."""
        self._by_port: dict[int, list[_Entry]] = {}
        self._guarding: dict[int, list[_Entry]] = {}
        behind: list[Listener] = []
        for lsn in listeners:
            if lsn.protocol is ListenerProtocol.TCP:
                entry = _Entry(lsn)
                self._by_port.setdefault(lsn.port, []).append(entry)
                if entry.chain.rbac or (entry.chain.tls is not None and lsn.name not in unguarded):
                    self._guarding.setdefault(lsn.port, []).append(entry)
            elif clusters is not None and (tcp := _tcp_behind(lsn)) is not None and _relayed(tcp, clusters):
                behind.append(tcp)
        self._behind = SniRoutes(behind) if behind else None

    def behind_http(self, port: int, address: str, src: str | None = None) -> PassthroughChain | None:
        """The TCP chain behind a sniffed HTTP chain of this destination that relays to its cluster, else None
        (the original destination). For connections the sniffer did not find to be HTTP."""
        return None if self._behind is None else self._behind.select(port, address, None, src=src)

    def _of(self, port: int, src: str | None, index: dict[int, list[_Entry]] | None = None) -> list[_Entry]:
        entries = (self._by_port if index is None else index).get(port, [])
        if not any(e.sources for e in entries):
            return entries
        ip = parse_ip(src) if src else None
        return [e for e in entries if e.applies(ip)]

    def declares(self, port: int, src: str | None = None) -> bool:
        """Some tcp_proxy chain for `src` owns `port`: what arrives there is passed through, never L7-proxied."""
        return bool(self._of(port, src))

    def guarded(self, port: int, src: str | None = None) -> bool:
        """Some chain of `port` authorizes or terminates TLS: a connection no chain takes is refused there
        (Envoy closes a connection that matches no filter chain), never passed to its original destination."""
        return bool(self._of(port, src, self._guarding))

    def terminates_tls(self, port: int, src: str | None = None) -> bool:
        return any(e.chain.tls is not None for e in self._of(port, src))

    def select(
        self, port: int, address: str, sni: str | None, tls: bool = False, alpn: tuple[str, ...] = (),
        src: str | None = None,
    ) -> PassthroughChain | None:  # fmt: skip
        """`tls`: the connection starts with a TLS record (transport_protocol "tls", else "raw_buffer");
        `alpn`: the protocols its ClientHello offers; `src`: the client's address (its own chains first)."""
        entries = [e for e in self._of(port, src) if e.accepts(tls) and (not e.alpn or e.alpn & set(alpn))]
        if any(e.alpn for e in entries):  # a chain naming an offered protocol is more specific than one without
            entries = [e for e in entries if e.alpn]
        if not entries:
            return None
        if len(entries) > 1 or entries[0].prefixes:
            ip = parse_ip(address)
            scored = [(e.prefix_len(ip), e) for e in entries]
            best = max(score for score, _ in scored)
            if best < 0:
                return None
            entries = [e for score, e in scored if score == best]
        if any(e.sources for e in entries):  # the source's own chains (its sidecar's) before the node-wide ones
            entries = [e for e in entries if e.sources]
        if sni:
            by_name = {name: e for e in entries for name in e.names}
            if by_name:
                for name in candidate_names(sni.lower()):
                    found = by_name.get(name)
                    if found is not None:
                        return found.chain
        for e in entries:
            if not e.names:
                return e.chain
        return None


def _relayed(tcp: Listener, clusters: Mapping[str, Cluster]) -> bool:
    """The kernel's rule (ebpf/policy.py tcp_handling): the proxy relays the chain to its cluster. Loaded on first
    use: ~0.3 MB of RSS that workers without such a chain do not pay."""
    return not load("planemesh.ebpf.policy").tcp_handling(tcp, clusters)[0]


def _tcp_behind(lsn: Listener) -> Listener | None:
    """A sniffed HTTP listener's TCP chain (its clusters) as a tcp_proxy chain; None without one, or when the
    listener terminates TLS (inside mTLS, sniff_tls.py relays to the original destination: istiod's inbound TCP
    chain's InboundPassthroughCluster)."""
    if not lsn.sniff or not lsn.tcp_clusters or lsn.tls is not None:
        return None
    return dataclasses.replace(
        lsn, protocol=ListenerProtocol.TCP, sniff=False, route_config=None, server_names=(), application_protocols=(),
        transport_protocol="",
    )
