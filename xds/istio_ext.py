"""The istio-proxy-only extensions istiod puts in sidecar resources, recognised by type URL (pure).

istio-proxy is Envoy plus Istio's own filters; upstream Envoy (and planemesh) have no proto for them, and
istiod often wraps them in a TypedStruct (`udpa.type.v1` or `xds.type.v3`) whose `type_url` names the real
type. None of them changes where a request or a connection goes: they exchange peer metadata between
sidecars, record Istio's metrics, or feed authentication results to RBAC. planemesh therefore never
rejects a push for carrying one (see docs/istio-conformance.md for what each one means here).
"""

from __future__ import annotations

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from planemesh.xds.translate_common import type_name

TYPED_STRUCTS = {"udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct"}

# type name -> why accepting it without running it is safe for planemesh's data path.
ISTIO_PROXY_TYPES = {
    "stats.PluginConfig": "istio.stats: Istio's standard metrics; planemesh exports its own per-plane metrics",
    "envoy.tcp.metadataexchange.config.MetadataExchange": (
        "istio.metadata_exchange (TCP): swaps peer metadata over ALPN istio-peer-exchange inside mTLS; "
        "planemesh does not originate istio mTLS, so there is no peer to exchange with"
    ),
    "io.istio.http.peer_metadata.Config": (
        "peer metadata (HTTP): adds/reads x-istio-peer headers for telemetry labels only"
    ),
    "io.istio.network.authn.Config": (
        "istio_authn: publishes the mTLS peer identity to later filters; planemesh's RBAC and XFCC read the peer "
        "certificate of the TLS connection themselves"
    ),
    "istio.set_internal_dst_address.v1.Config": "set_dst_address: an internal-listener hop of waypoints",
    "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig": (
        "istio.alpn: overrides the upstream ALPN of istio mTLS; planemesh's upstreams are plaintext"
    ),
    "istio.envoy.config.filter.http.authn.v2alpha1.FilterConfig": "legacy istio_authn (HTTP)",
    "envoy.extensions.filters.http.wasm.v3.Wasm": "a null-VM Wasm wrapper of istio.stats/metadata_exchange",
    "envoy.extensions.filters.network.wasm.v3.Wasm": "a null-VM Wasm wrapper of istio.stats/metadata_exchange",
}
# Filter names istiod gives these extensions (a TypedStruct-wrapped Wasm filter is only istio's by name).
ISTIO_PROXY_NAMES = {"istio.stats", "istio.metadata_exchange", "istio_authn", "istio.alpn", "set_dst_address"}


def inner_type(typed_config: any_pb2.Any) -> str:
    """The type name a typed_config stands for, looking through a TypedStruct wrapper."""
    outer = type_name(typed_config.type_url)
    if outer not in TYPED_STRUCTS:
        return outer
    from udpa.type.v1 import typed_struct_pb2

    ts = typed_struct_pb2.TypedStruct()  # xds.type.v3.TypedStruct has the same wire shape
    try:
        ts.ParseFromString(typed_config.value)
    except DecodeError:  # an undecodable wrapper is simply not an istio extension
        return outer
    return type_name(ts.type_url) or outer


def istio_extension(name: str, typed_config: any_pb2.Any) -> str | None:
    """Why this filter is an istio-proxy extension that is safe to accept, or None when it is not one."""
    kind = inner_type(typed_config)
    reason = ISTIO_PROXY_TYPES.get(kind)
    if reason is None:
        return None
    if kind.endswith(".wasm.v3.Wasm") and name not in ISTIO_PROXY_NAMES:
        return None  # a user's Wasm filter: refused like any unknown filter
    return reason
