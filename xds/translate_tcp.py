"""A filter chain's tcp_proxy -> its clusters, and whether it is istiod's default chain of the listener's own
service (split from xds/translate.py).

The kernel may bypass a single-cluster tcp_proxy chain only where the cluster would choose the connection's
original destination anyway (ebpf/policy.py `keeps_destination`). One case needs istiod's naming, and is
decided here: istiod's per-service outbound listener (`VIP_PORT`, `bind_to_port: false`) whose chain sends the
service's traffic to the service's own default cluster `outbound|PORT||HOST`. istiod builds that chain
(pilot/pkg/networking/core/tls.go, buildSidecarOutboundTCPFilterChainOpts) when no VirtualService `tcp:` route
applies: no filter_chain_match of its own (the listener's VIP is the match) and no chain metadata. A chain
from a VirtualService carries `metadata.filter_metadata.istio.config` naming it
(`/apis/networking.istio.io/v1alpha3/namespaces/NS/virtual-service/NAME`), or its own destination subnets;
a subset is `outbound|PORT|SUBSET|HOST`; another service or port names another cluster. Those are relayed
by the proxy. The tcp_proxy `stat_prefix` tells nothing here: istiod sets it to the cluster name in both
cases.
"""

from __future__ import annotations

from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from planemesh.model.config import ConfigError, WeightedCluster
from planemesh.xds.translate_common import only

TCP_PROXY_FIELDS = {"stat_prefix", "cluster", "weighted_clusters", "idle_timeout", "access_log"}


def tcp_proxy(last, fpath: str) -> tcp_proxy_pb2.TcpProxy:
    """The chain's terminal filter as a TcpProxy, its fields checked."""
    tcp = tcp_proxy_pb2.TcpProxy()
    last.typed_config.Unpack(tcp)
    only(tcp, TCP_PROXY_FIELDS, fpath)
    return tcp


def tcp_clusters(tcp: tcp_proxy_pb2.TcpProxy, fpath: str) -> tuple[WeightedCluster, ...]:
    if tcp.cluster:
        return (WeightedCluster(tcp.cluster, 1),)
    clusters = tuple(WeightedCluster(w.name, w.weight) for w in tcp.weighted_clusters.clusters)
    if not clusters:
        raise ConfigError(fpath, "tcp_proxy needs a cluster")
    return clusters


def istio_default_cluster(name: str, port: int) -> bool:
    """`outbound|PORT||HOST`: istiod's cluster of a whole service (no subset) on `port`."""
    parts = name.split("|")
    return len(parts) == 4 and parts[0] == "outbound" and parts[1] == str(port) and not parts[2] and bool(parts[3])


def from_virtual_service(chain) -> bool:
    """istiod marks the chains it builds from a VirtualService with the config's name (metadata istio.config)."""
    fm = chain.metadata.filter_metadata
    return "istio" in fm and "config" in fm["istio"].fields


def own_service_chain(chain, tcp: tcp_proxy_pb2.TcpProxy, port: int, vip: bool) -> bool:
    """istiod's default chain of a per-service listener (module doc): `vip`, the listener stands for one
    destination address (it does not bind, its address is not a wildcard)."""
    m = chain.filter_chain_match
    return (
        vip
        and bool(tcp.cluster)
        and not m.prefix_ranges
        and not m.server_names
        and istio_default_cluster(tcp.cluster, port)
        and not from_virtual_service(chain)
    )
