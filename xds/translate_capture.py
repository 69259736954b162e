"""istiod's capture listeners and chains planemesh cannot tell apart (split from xds/translate.py).

virtualOutbound's chains are only noted (planemesh intercepts by original destination); chains of one
listener that differ only by application_protocols become one listener per destination; a virtualInbound
port chain shadowed by an outbound listener of the same destination is dropped.
"""

from __future__ import annotations

import dataclasses

from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from planemesh.model.config import ConfigError, Listener, ListenerProtocol
from planemesh.xds.translate_common import note_ignored, type_name

TCP_PROXY = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
BLACKHOLE = "BlackHoleCluster"  # istiod's cluster with no endpoints: what it blocks goes there


def _key(lsn: Listener) -> tuple:
    """What tells two listeners apart: destination, SNI, and whether it terminates TLS (a permissive port has
    a TLS chain and a plaintext one: transport_protocol tls / raw_buffer, agent/proxy/tls.py), and the sources
    a local workload's listener is scoped to (agent/workloads/merge.py)."""
    return (lsn.plane, lsn.port, lsn.prefixes, lsn.server_names, lsn.tls is not None, lsn.sources)


def merge_same_destination(out: list[Listener], paths: list[str]) -> list[Listener]:
    """Chains of one listener that planemesh cannot tell apart (they differ only by transport_protocol or
    application_protocols) -> one listener per destination: HTTP with TCP -> HTTP sniffed, carrying the TCP
    chain's clusters (what is not HTTP goes there: agent/proxy/sni_routing.py `behind_http`), equal HTTP chains
    -> one, TCP fallbacks behind the first -> noted."""
    groups: dict[tuple, list[int]] = {}
    for i, lsn in enumerate(out):
        groups.setdefault(_key(lsn), []).append(i)
    merged: list[Listener] = []
    for idx in groups.values():
        http = [i for i in idx if out[i].protocol is ListenerProtocol.HTTP]
        tcp = [i for i in idx if out[i].protocol is ListenerProtocol.TCP]
        keep = http[0] if http else tcp[0]
        first = out[keep]
        for i in http[1:]:
            other = out[i]
            if _handling(other) != _handling(first):
                raise ConfigError(
                    paths[i],
                    f"another HTTP chain ({paths[keep]}) serves the same destination with other routes or filters; "
                    "planemesh cannot choose between them by transport_protocol/application_protocols",
                )
            note_ignored(paths[i], f"the same HTTP handling as {paths[keep]}")
        # istiod's REGISTRY_ONLY: the fallback is BlackHoleCluster; not sniffing makes the HTTP parser refuse
        # non-HTTP bytes instead of passing them through.
        passthrough = [i for i in tcp if not _blackhole(out[i])]
        for i in tcp if http else tcp[1:]:
            if out[i].network_rbac and not _blackhole(out[i]):  # dropping it would let unauthorized bytes by
                raise ConfigError(
                    paths[i],
                    "network RBAC on a TCP chain that shares its destination with another chain: planemesh "
                    "enforces it only on a destination's one tcp_proxy chain",
                )
            if http and _blackhole(out[i]):
                why = "BlackHoleCluster (REGISTRY_ONLY): the HTTP listener is not sniffed, non-HTTP bytes are refused"
            elif http and i == passthrough[0]:
                why = ("the HTTP chain is sniffed; non-HTTP bytes go to this chain's cluster (relayed; the original "
                       "destination where the cluster would pick it: ebpf/policy.py tcp_handling)")
            elif http:
                why = "a fallback chain behind the destination's first TCP chain, which takes the non-HTTP bytes"
            else:
                why = "a fallback chain behind the chain that serves this destination"
            note_ignored(paths[i], why)
        if http and passthrough:
            # a TLS group: every chain's ALPN decides termination (agent/proxy/sniff_tls.py)
            alpn = tuple(dict.fromkeys(a for i in idx for a in out[i].application_protocols)) if first.tls else ()
            tcp_chain = out[passthrough[0]]
            first = dataclasses.replace(first, sniff=True, application_protocols=alpn,
                                        tcp_clusters=tcp_chain.tcp_clusters, own_service=tcp_chain.own_service)
        merged.append(first)
    return merged


def _handling(lsn: Listener) -> tuple:
    return (lsn.route_config, lsn.http_filters, lsn.upgrades, lsn.tls, lsn.forward_client_cert, lsn.client_cert_details,
            lsn.trace_sampling)


def _blackhole(lsn: Listener) -> bool:
    return bool(lsn.tcp_clusters) and all(w.name == BLACKHOLE for w in lsn.tcp_clusters)


def capture_chain_listeners(listener, path: str) -> None:
    """virtualOutbound (use_original_dst): Envoy hands each connection to the listener of its original
    destination; planemesh's interception already delivers it there, so only its chains' meaning is noted."""
    for ci, chain in enumerate(listener.filter_chains):
        cpath = f"{path}.filter_chains[{ci}]"
        kinds = {type_name(f.typed_config.type_url) for f in chain.filters}
        if TCP_PROXY not in kinds:
            raise ConfigError(cpath, "a use_original_dst listener's chains must end in tcp_proxy")
        m = chain.filter_chain_match
        own_port = (
            m.HasField("destination_port") and m.destination_port.value == listener.address.socket_address.port_value
        )
        if not own_port and any(_tcp_cluster(f) == BLACKHOLE for f in chain.filters):
            raise ConfigError(
                cpath,
                "a BlackHoleCluster catch-all (Istio outboundTrafficPolicy REGISTRY_ONLY) is not supported: planemesh "
                "passes connections to undeclared destinations and will not pretend to block them",
            )
        note_ignored(
            cpath,
            "use_original_dst dispatch: planemesh intercepts by original destination; connections no listener "
            "declares are passed through (Istio ALLOW_ANY = PassthroughCluster)",
        )


def _tcp_cluster(flt) -> str | None:
    if type_name(flt.typed_config.type_url) != TCP_PROXY:
        return None
    tcp = tcp_proxy_pb2.TcpProxy()
    flt.typed_config.Unpack(tcp)
    return tcp.cluster or None


def drop_shadowed_inbound(listeners: list[Listener], inbound: set[str]) -> list[Listener]:
    """A virtualInbound port chain and an outbound listener on the same plane/port/destination: the outbound
    one wins (it carries the routing istiod computed for clients: splits, retries, faults); the inbound chain
    only hands the request to the local application, which the original destination does as well."""
    outbound = {_key(lsn) for lsn in listeners if lsn.name not in inbound}
    kept = []
    for lsn in listeners:
        if lsn.name in inbound and _key(lsn) in outbound:
            note_ignored(f"listener[{lsn.name}]", "shadowed by the outbound listener of the same port")
            continue
        kept.append(lsn)
    return kept
