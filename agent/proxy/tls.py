"""TLS termination in a plane's L7 proxy: a transport under the unchanged HTTP/1.1 and h2 codecs.

A connection whose original destination has a TLS filter chain (Listener.tls) waits for its first bytes on
the accepting transport, then:
  TLS ClientHello (0x16)            -> handshake (the TLS engine: pyOpenSSL over the cryptography wheel's
                                       OpenSSL, agent/tls/transport.py), then Downstream as for plaintext;
  anything else, a plaintext chain  -> plain Downstream (permissive port: `transport_protocol` raw_buffer);
  anything else, TLS only (strict)  -> closed, counted (`plaintext_refused`).
A failed handshake (wrong CA, expired, no client certificate where one is required, timeout) is counted and
logged, the connection closed; a peer whose certificate has no SAN matching the context's matchers is closed
after the handshake (`san_refused`). The peer's SPIFFE ID is kept on the connection's `ssl_object`
(agent/tls/engine.py TlsPeerView, `planemesh_peer`) for the access log. Handshakes in progress count in the plane's
open connections.

SSL contexts are built once per (context, secrets) value and reused across snapshots: a rotated secret is
a new value, so new handshakes use the new certificate while existing connections keep theirs. Keys reach
OpenSSL from memory (never a file on disk).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from planemesh.agent.proxy import tls_lazy
from planemesh.agent.proxy.routing import parse_ip
from planemesh.agent.proxy.tls_context import peer_sans, uri_of
from planemesh.agent.proxy.xfcc import connection_xfcc, element
from planemesh.agent.tls.failure import TlsFailure
from planemesh.model.config import Listener, ListenerProtocol, Snapshot, TrafficDirection
from planemesh.model.tls_config import TlsContext, TrustSecret, plane_tls, san_accepts

if TYPE_CHECKING:
    from OpenSSL import SSL

    from planemesh.agent.tls.engine import TlsPeerView

log = logging.getLogger("planemesh.proxy.tls")
HANDSHAKE_TIMEOUT_S = 10.0  # Envoy: transport_socket_connect_timeout, unset by default (asyncio's default: 60 s)
PEEK_TIMEOUT_S = 10.0  # first byte of a connection to a TLS port; Envoy's listener_filters_timeout is 15 s
TLS_HANDSHAKE_RECORD = 0x16
DECISIONS_KEPT = 4096  # (original destination, port) -> chain decisions kept per snapshot
PLANE_CHAIN = "~mtls"  # name suffix of the chains a plane's SLA mTLS adds (plane_tcp_chains, _with_plane_tls)


class TlsStats:
    __slots__ = ("handshake_failed", "handshakes", "overloaded", "peer_cert_refused", "plaintext_accepted",
                 "plaintext_refused", "rbac_denied", "san_refused", "timeouts")  # fmt: skip

    def __init__(self) -> None:
        self.handshakes = 0  # completed
        self.handshake_failed = 0  # every failed handshake (including the two below)
        self.peer_cert_refused = 0  # the peer's certificate did not verify (wrong CA, expired, missing)
        self.timeouts = 0  # no first byte or no finished handshake in time
        self.san_refused = 0  # verified, but no SAN matched the context's matchers
        self.plaintext_refused = 0  # plaintext on a TLS-only (strict) port
        self.plaintext_accepted = 0  # plaintext on a permissive port
        self.overloaded = 0  # closed before the handshake: the plane's max_connections were open
        self.rbac_denied = 0  # requests refused (403) by an RBAC filter (agent/proxy/authz.py)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class TlsDecision:
    """What a TLS-capable port does: the TLS chain's context, and whether plaintext is also served."""

    listener: Listener
    context: SSL.Context
    plaintext: bool
    local_uri: str | None = None  # our certificate's SPIFFE ID (XFCC's By=)


_REFUSING: list = []  # a server context without a certificate (every handshake fails, counted), made on first use


def _refusing() -> SSL.Context:
    if not _REFUSING:
        _REFUSING.append(tls_lazy.engine().refusing_context())
    return _REFUSING[0]


class TlsRoutes:
    """The plane's TLS ports from one snapshot; contexts come from (and go back to) the proxy's cache."""

    def __init__(self, snapshot: Snapshot, plane: str, cache: dict) -> None:
        self.ports: dict[int, list[Listener]] = {}
        fresh: dict = {}
        sla = next((p.sla for p in snapshot.planes if p.name == plane), None)
        self.sla = sla
        self.mode = sla.mtls if sla is not None else ""  # the plane SLA's mTLS mode (model/planes.py)
        http = [lsn for lsn in snapshot.listeners_of(plane) if lsn.protocol is ListenerProtocol.HTTP]
        for lsn in http:
            if not (self.mode == "disable" and lsn.tls is not None and governed(lsn)):
                self.ports.setdefault(lsn.port, []).append(lsn)
        # HTTP listeners of the ports where some is OUTBOUND: the mode skips those destinations (mode_for)
        outbound_ports = {lsn.port for lsn in http if not governed(lsn)} if self.mode else set()
        self._outbound = {port: [lsn for lsn in http if lsn.port == port] for port in outbound_ports}
        self._modes: dict[tuple[str, int], str] = {}
        # The plane's own chain: what its sniffing listener terminates where no xDS chain does (sniff_tls.py)
        self.plane_chain: Listener | None = None
        if (forced := plane_tls(sla)) is not None:
            self.ports = {p: _with_plane_tls(ls, forced) for p, ls in self.ports.items()}
            self.plane_chain = Listener(plane + PLANE_CHAIN, plane, 0, ListenerProtocol.HTTP, sniff=True, tls=forced,
                                        transport_protocol="tls")  # fmt: skip
        self.ports = {p: ls for p, ls in self.ports.items() if any(lsn.tls is not None for lsn in ls)}
        chains = [lsn for ls in self.ports.values() for lsn in ls if lsn.tls is not None]
        for lsn in chains + ([self.plane_chain] if self.plane_chain is not None else []):
            tls = lsn.tls
            assert tls is not None
            cert = snapshot.secrets.get(tls.cert) if tls.cert else None
            trust = snapshot.secrets.get(tls.trust) if tls.trust else None
            key = (tls, cert, trust)
            if key not in fresh:
                try:
                    fresh[key] = cache.get(key) or tls_lazy.engine().build_engine_context(tls, cert, trust, server=True)
                except (ValueError, OSError) as exc:  # translation checks; never take the worker down
                    log.error("listener %s: no TLS context (%s): its TLS connections are refused", lsn.name, exc)
        certs = {lsn.tls.cert for lsn in chains if lsn.tls.cert} | ({forced.cert} if forced is not None else set())
        self._local_uri = {name: uri_of(snapshot.secrets.get(name)) for name in certs}
        cache.clear()
        cache.update(fresh)  # contexts no listener uses any more are dropped
        self._cache = fresh
        self._decided: dict[tuple[str, int], TlsDecision | None] = {}

    def decide(self, ip: str, port: int) -> TlsDecision | None:
        """None: not a TLS port (plain Downstream). Chains are matched by port and most specific prefix;
        the answer is kept per (address, port) for this snapshot (parsing the address cost ~50 us a handshake)."""
        if port not in self.ports:
            return None
        return _kept(self._decided, (ip, port), self._decide)

    def mode_for(self, ip: str, port: int) -> str:
        """The plane's mTLS mode for a sniffed connection to (ip, port): "" where the destination's most
        specific HTTP listener is OUTBOUND (a local pod's own egress, originated per its cluster), else the
        plane's. Kept per (address, port) like decide()."""
        if port not in self._outbound:
            return self.mode
        return _kept(self._modes, (ip, port), self._mode_at)

    def _mode_at(self, ip: str, port: int) -> str:
        best = most_specific(self._outbound[port], ip)
        return "" if best and not any(governed(lsn) for lsn in best) else self.mode

    def _decide(self, ip: str, port: int) -> TlsDecision | None:
        best = most_specific(self.ports[port], ip)
        tls_chain = next((lsn for lsn in best if lsn.tls is not None), None)
        if tls_chain is None:
            return None
        tls = tls_chain.tls
        assert tls is not None
        plaintext = any(lsn.tls is None and lsn.transport_protocol != "tls" for lsn in best)
        if self.mode and any(governed(lsn) for lsn in best):
            # the plane's SLA decides over its chains (strict: never plaintext; permissive: both); an OUTBOUND
            # plaintext chain of the same destination keeps taking plaintext
            plaintext = self.mode == "permissive" or any(lsn.tls is None and not governed(lsn) for lsn in best)
        context = self._context(tls_chain)
        if context is None:  # its context could not be built (logged): TLS here is refused
            context = _refusing()
        return TlsDecision(tls_chain, context, plaintext, self._local_uri.get(tls.cert))

    def plane_decision(self, port: int) -> TlsDecision | None:
        """The plane's own mTLS (strict / permissive) for a connection to `port` no xDS chain terminates;
        None without a plane mode."""
        chain = self.plane_chain
        if chain is None:
            return None
        tls = chain.tls
        assert tls is not None
        context = self._context(chain) or _refusing()
        return TlsDecision(replace(chain, port=port), context, self.mode == "permissive", self._local_uri.get(tls.cert))

    def contexts(self) -> list[SSL.Context]:
        """The server contexts in use (tests, stats)."""
        return list(self._cache.values())

    def _context(self, lsn: Listener) -> SSL.Context | None:
        for (tls, _cert, _trust), ctx in self._cache.items():
            if tls is lsn.tls or tls == lsn.tls:
                return ctx
        return None


def _kept(cache: dict, key: tuple[str, int], compute: Any) -> Any:
    """compute(ip, port), kept in `cache` for this snapshot; started afresh when full (many distinct destinations:
    a scan), so a cache never grows past DECISIONS_KEPT."""
    try:
        return cache[key]
    except KeyError:
        pass
    if len(cache) >= DECISIONS_KEPT:
        cache.clear()
    value = cache[key] = compute(*key)
    return value


def governed(lsn: Listener) -> bool:
    """The plane's SLA mTLS mode applies to this chain: its listener is not OUTBOUND (Istio's PeerAuthentication
    governs inbound traffic; a pod's outbound connections are originated per their cluster, xds/translate_mtls.py)."""
    return lsn.direction is not TrafficDirection.OUTBOUND


def most_specific(listeners: Iterable[Listener], ip: str) -> list[Listener]:
    """The listeners whose destination prefixes match `ip` most specifically (no prefixes: any, length 0)."""
    addr = parse_ip(ip)
    best: list[Listener] = []
    best_len = -1
    for lsn in listeners:
        lengths = [n.prefixlen for n in lsn.prefixes if n.version == addr.version and addr in n]
        length = max(lengths) if lengths else (0 if not lsn.prefixes else -1)
        if length > best_len:
            best, best_len = [lsn], length
        elif length == best_len and length >= 0:
            best.append(lsn)
    return best


def _with_plane_tls(listeners: list[Listener], forced: TlsContext) -> list[Listener]:
    """A plane requiring mTLS: every destination (port, prefixes) without a TLS chain gets one with the
    plane's context; chains that terminate TLS already keep theirs, and OUTBOUND ones are left as they are."""
    tls_dests = {lsn.prefixes for lsn in listeners if lsn.tls is not None}
    added = [
        _plane_chain(lsn, forced)
        for lsn in listeners
        if lsn.tls is None and governed(lsn) and lsn.prefixes not in tls_dests
    ]
    return listeners + added


def plane_tcp_chains(listeners: Iterable[Listener], sla: object) -> tuple[Listener, ...]:
    """A plane's listeners with its tcp_proxy chains as the SLA's mTLS mode makes them (sni_routing.py selects
    among these). strict: every chain without TLS terminates the plane's mTLS instead (plaintext then matches no
    chain: refused, `plaintext_refused`); xDS's own TLS chains come first, so they win a tie. permissive: a
    chain without TLS (and not one for a client's own TLS) takes plaintext only, and a twin terminating the
    plane's mTLS is appended last. disable: no chain terminates TLS (its bytes are relayed as they are).
    No mode: as xDS says. HTTP listeners and OUTBOUND chains (governed()) are returned unchanged."""
    mode = getattr(sla, "mtls", "")
    listeners = tuple(listeners)
    tcp = {id(lsn) for lsn in listeners if lsn.protocol is ListenerProtocol.TCP and governed(lsn)}
    if mode == "disable":
        return tuple(replace(lsn, tls=None) if id(lsn) in tcp else lsn for lsn in listeners)
    forced = plane_tls(sla)
    if forced is None:
        return listeners
    plain = {id(lsn) for lsn in listeners if id(lsn) in tcp and lsn.tls is None}
    if mode == "strict":
        kept = tuple(lsn for lsn in listeners if id(lsn) not in plain)
        return kept + tuple(_plane_chain(lsn, forced) for lsn in listeners if id(lsn) in plain)
    own_tls = {id(lsn) for lsn in listeners if lsn.transport_protocol == "tls"}  # a client's own TLS: not ours
    twins = tuple(_plane_chain(lsn, forced) for lsn in listeners if id(lsn) in plain - own_tls)
    kept = tuple(replace(lsn, transport_protocol="raw_buffer") if id(lsn) in plain and not lsn.transport_protocol
                 else lsn for lsn in listeners)  # fmt: skip
    return kept + twins


def _plane_chain(lsn: Listener, forced: TlsContext) -> Listener:
    """`lsn`'s twin terminating the plane's mTLS (HTTP ports and tcp_proxy chains alike)."""
    return replace(lsn, name=lsn.name + PLANE_CHAIN, tls=forced, transport_protocol="tls")


def unguarded_twins(chains: Iterable[Listener], sla: object) -> frozenset[str]:
    """A permissive plane's mTLS twins: their TLS does not make a port refuse what no chain takes
    (sni_routing.SniRoutes.guarded), so plaintext and other TLS reach their original destinations as before."""
    if getattr(sla, "mtls", "") != "permissive":
        return frozenset()
    return frozenset(
        lsn.name for lsn in chains if lsn.protocol is ListenerProtocol.TCP and lsn.name.endswith(PLANE_CHAIN)
    )


def _subject(ssl_object: TlsPeerView) -> str:
    return ssl_object.subject()


HANDSHAKE_ERRORS = (TlsFailure, OSError, TimeoutError, ConnectionError)


def handshake_failed(stats: TlsStats, exc: BaseException, where: str, port: int) -> None:
    """Count and log a failed server handshake (HTTP and tcp_proxy chains)."""
    stats.handshake_failed += 1
    if "CERTIFICATE" in str(exc).upper():
        stats.peer_cert_refused += 1
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):  # uvloop/asyncio: ConnectionAborted
        stats.timeouts += 1
    log.info("%s: TLS handshake on port %s failed: %s", where, port, exc)


def check_peer(proxy: Any, tls: TlsContext, transport: asyncio.BaseTransport) -> tuple[list[str], list[str]] | None:
    """After a finished handshake: (URI SANs, DNS SANs) of the client, or None when no SAN matches the
    context's (and its validation Secret's) matchers: the connection is aborted, counted and logged."""
    uris, dns = peer_sans(transport.get_extra_info("ssl_object"))
    stats: TlsStats = proxy.tls_stats
    stats.handshakes += 1
    trust = proxy.table.snapshot.secrets.get(tls.trust) if tls.trust else None
    matchers = tls.san + (trust.san if isinstance(trust, TrustSecret) else ())
    if (uris or dns or matchers) and not san_accepts(matchers, uris, dns):
        stats.san_refused += 1
        log.warning("%s: client certificate SANs %s match no matcher: closed", transport.get_extra_info("peername"),
                    uris + dns)  # fmt: skip
        transport.abort()
        return None
    return uris, dns


def spiffe_of(uris: list[str]) -> str | None:
    return next((u for u in uris if u.startswith("spiffe://")), None)


class _TlsChecked(asyncio.Protocol):
    """The first protocol over a finished handshake: checks the peer's SANs, keeps its SPIFFE ID on the
    SSLObject, then hands the transport to the HTTP codec (or closes it, counted)."""

    __slots__ = ("decision", "make", "proxy", "tls")

    def __init__(self, proxy: Any, decision: TlsDecision, make: Callable[[], asyncio.Protocol]) -> None:
        self.proxy, self.decision, self.make = proxy, decision, make
        self.tls: TlsContext = decision.listener.tls  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        checked = check_peer(self.proxy, self.tls, transport)
        if checked is None:
            return
        uris, dns = checked
        lsn = self.decision.listener
        if ssl_object is not None:
            ssl_object.planemesh_peer = spiffe_of(uris)
            ssl_object.planemesh_local = self.decision.local_uri  # ours (Istio's destination_principal)
            der = ssl_object.getpeercert(binary_form=True)
            ssl_object.planemesh_xfcc = connection_xfcc(  # agent/proxy/xfcc.py, read by request_head()
                lsn.forward_client_cert,
                bool(der),
                lambda: element(self.decision.local_uri, der, _subject(ssl_object), uris, dns, lsn.client_cert_details),
            )
        inner = self.make()
        transport.set_protocol(inner)  # type: ignore[attr-defined]
        inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # never: connection_made handed the transport over
        pass


def accept_factory(proxy: Any, make_downstream: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
    """The accepting server's protocol factory: plain Downstream unless the plane has TLS ports."""

    def make() -> asyncio.Protocol:
        tls = proxy.table.tls
        return make_downstream() if tls is None or not tls.ports else _TlsGate(proxy, make_downstream)

    return make


class _TlsGate(asyncio.Protocol):
    """Decides whether an accepted connection is TLS: by its destination's chains, then by its first byte."""

    __slots__ = ("counted", "decision", "make", "proxy", "timer", "transport")

    def __init__(self, proxy: Any, make: Callable[[], asyncio.Protocol]) -> None:
        self.proxy, self.make = proxy, make
        self.transport: Any = None
        self.decision: TlsDecision | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        proxy = self.proxy
        sockname, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        decision = proxy.table.tls.decide(*proxy.original_destination(sockname, peer))
        if decision is None:
            self._hand_over(transport, b"")
            return
        if proxy.open_connections() >= proxy.sla.max_connections:  # handshakes cost CPU: refuse before one
            proxy.stats.overloaded += 1
            proxy.tls_stats.overloaded += 1
            transport.abort()
            return
        self.transport, self.decision = transport, decision
        proxy.stats.downstream_active += 1  # a handshake in progress holds a place in the plane's budget
        proxy.tls_pending += 1  # (open_connections counts it)
        self.counted = True
        self.timer = proxy.loop.call_later(PEEK_TIMEOUT_S, self._no_first_byte)

    def data_received(self, data: bytes) -> None:
        decision, transport = self.decision, self.transport
        if self.timer is not None:
            self.timer.cancel()
        if decision is None or not data:
            return
        self.decision = None  # decided once: the transport goes to the TLS engine or the plain codec
        if data[0] != TLS_HANDSHAKE_RECORD:
            self._release()
            if not decision.plaintext:
                self.proxy.tls_stats.plaintext_refused += 1
                log.info("%s: plaintext on TLS-only port %s: closed", self._where(), decision.listener.port)
                transport.abort()
                return
            self.proxy.tls_stats.plaintext_accepted += 1
            self._hand_over(transport, data)
            return
        proxy = self.proxy

        def checked() -> asyncio.Protocol:
            self._release()  # the codec's connection_made counts the connection from here
            return _TlsChecked(proxy, decision, self.make)

        def failed(exc: BaseException) -> None:
            self._release()
            handshake_failed(proxy.tls_stats, exc, self._where(), decision.listener.port)

        tls_lazy.transport().serve_tls(transport, data, checked, decision.context, HANDSHAKE_TIMEOUT_S, failed)

    def eof_received(self) -> bool:
        return False  # closed before a byte (port probes, health checks): close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self._release()

    def _hand_over(self, transport: Any, data: bytes) -> None:
        ds = self.make()
        transport.set_protocol(ds)
        ds.connection_made(transport)
        if data:
            ds.data_received(data)

    def _no_first_byte(self) -> None:
        if self.decision is not None:
            self.proxy.tls_stats.timeouts += 1
            self.transport.abort()

    def _release(self) -> None:
        if self.counted:
            self.counted = False
            self.proxy.stats.downstream_active -= 1
            self.proxy.tls_pending -= 1

    def _where(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return peer[0] if peer else "?"


TlsChecked = _TlsChecked  # public: the sniffing listener terminates mTLS too (agent/proxy/sniff_tls.py)
