"""Envoy's internal upstream transport and internal listeners (istio's waypoint/HBONE shapes).

`internal_upstream` wraps a cluster's transport socket; its only addition is `passthrough_metadata`, which
Envoy inserts into the downstream connection of an *internal listener* when the host is an
`envoy_internal_address`. planemesh has no user-space sockets: such endpoints are refused (a TCP
socket_address is needed, xds/translate_common.py socket_address), so every host planemesh accepts is a
socket address, for which Envoy uses the wrapped socket alone. Unwrapping is then exact.
An internal listener (`internal_listener: {}`) receives connections only from internal-address endpoints:
none can be accepted here, so it would receive none in Envoy either; it is accepted and serves nothing.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.internal_upstream.v3 import internal_upstream_pb2
from google.protobuf.message import DecodeError

from planemesh.model.config import ConfigError
from planemesh.xds.translate_common import note_ignored, only, type_name

INTERNAL_UPSTREAM = "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport"
WHY_UNWRAPPED = (
    "internal_upstream: passthrough_metadata reaches an internal listener only through envoy_internal_address "
    "hosts, which planemesh refuses; to a socket address Envoy uses the wrapped transport socket alone"
)
WHY_INTERNAL_LISTENER = (
    "internal listener: only envoy_internal_address endpoints connect to it and planemesh refuses those, so it "
    "receives no connection (as in Envoy with no such endpoint); accepted, nothing is served"
)


def _inner(socket, path: str):
    """An internal_upstream socket -> the socket it wraps (raw_buffer when it wraps none)."""
    only(socket, {"name", "typed_config"}, path)
    cfg = internal_upstream_pb2.InternalUpstreamTransport()
    try:
        socket.typed_config.Unpack(cfg)
    except DecodeError as exc:
        raise ConfigError(f"{path}.typed_config", f"malformed InternalUpstreamTransport: {exc}") from None
    only(cfg, {"passthrough_metadata", "transport_socket"}, f"{path}.typed_config")
    note_ignored(path, WHY_UNWRAPPED)
    return cfg.transport_socket if cfg.HasField("transport_socket") else None


def _is_internal(socket) -> bool:
    return type_name(socket.typed_config.type_url) == INTERNAL_UPSTREAM


def unwrap_internal_upstream(cluster, path: str):
    """The cluster as planemesh translates it: every internal_upstream socket replaced by the one it wraps.
    The message is copied only when it has one (istiod's sidecar clusters have none)."""
    top = cluster.HasField("transport_socket") and _is_internal(cluster.transport_socket)
    matches = [i for i, m in enumerate(cluster.transport_socket_matches) if _is_internal(m.transport_socket)]
    if not top and not matches:
        return cluster
    out = cluster_pb2.Cluster()
    out.CopyFrom(cluster)
    if top:
        inner = _inner(cluster.transport_socket, f"{path}.transport_socket")
        out.ClearField("transport_socket")
        if inner is not None:
            out.transport_socket.CopyFrom(inner)
    for i in matches:
        mpath = f"{path}.transport_socket_matches[{i}].transport_socket"
        inner = _inner(cluster.transport_socket_matches[i].transport_socket, mpath)
        out.transport_socket_matches[i].ClearField("transport_socket")
        if inner is not None:
            out.transport_socket_matches[i].transport_socket.CopyFrom(inner)
    return out


def internal_listener(listener, path: str) -> bool:
    """True for an internal listener (noted: it serves nothing); the fields it may carry are Envoy's."""
    if not listener.HasField("internal_listener"):
        return False
    if listener.HasField("address"):
        raise ConfigError(f"{path}.address", "an internal listener has no address")
    note_ignored(f"{path}.internal_listener", WHY_INTERNAL_LISTENER)
    return True
