"""Which SDS secrets a Listener or a Cluster references (the client subscribes to them). Pure protobuf.

Names come from the TLS transport sockets: a listener's filter chains (DownstreamTlsContext), a cluster's
transport_socket and transport_socket_matches (UpstreamTlsContext); in each, the common_tls_context's
tls_certificate_sds_secret_configs, validation_context_sds_secret_config and
combined_validation_context.validation_context_sds_secret_config. And from a listener's metadata planemesh.sla
(its planes' mTLS certificate and roots).
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import message

from planemesh.xds.translate_common import planemesh_metadata

_T = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
DOWNSTREAM_TLS = _T + "DownstreamTlsContext"
UPSTREAM_TLS = _T + "UpstreamTlsContext"


def tls_context(socket: base_pb2.TransportSocket) -> tls_pb2.DownstreamTlsContext | tls_pb2.UpstreamTlsContext | None:
    """The TLS context of a transport socket, None when it is not TLS (or undecodable: translation says so)."""
    url = socket.typed_config.type_url
    ctx: tls_pb2.DownstreamTlsContext | tls_pb2.UpstreamTlsContext
    if url == DOWNSTREAM_TLS:
        ctx = tls_pb2.DownstreamTlsContext()
    elif url == UPSTREAM_TLS:
        ctx = tls_pb2.UpstreamTlsContext()
    else:
        return None
    try:
        ctx.ParseFromString(socket.typed_config.value)
    except message.DecodeError:
        return None
    return ctx


def common_secret_names(common: tls_pb2.CommonTlsContext) -> set[str]:
    names = {c.name for c in common.tls_certificate_sds_secret_configs if c.name}
    if common.HasField("validation_context_sds_secret_config"):
        names.add(common.validation_context_sds_secret_config.name)
    if common.HasField("combined_validation_context"):
        names.add(common.combined_validation_context.validation_context_sds_secret_config.name)
    return names - {""}


def _names(sockets: Iterable[base_pb2.TransportSocket]) -> set[str]:
    out: set[str] = set()
    for socket in sockets:
        ctx = tls_context(socket)
        if ctx is not None:
            out |= common_secret_names(ctx.common_tls_context)
    return out


def listener_secret_names(listener: listener_pb2.Listener) -> set[str]:
    chains = [*listener.filter_chains]
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    return _names(c.transport_socket for c in chains if c.HasField("transport_socket")) | _sla_secret_names(listener)


def _sla_secret_names(listener: listener_pb2.Listener) -> set[str]:
    """The Secrets a listener's metadata planemesh.sla names for its planes' mTLS (xds/translate_sla.py): its
    mtls_cert / mtls_trust, else, when it sets mtls strict or permissive, istio-agent's `default` / `ROOTCA`."""
    sla = planemesh_metadata(listener.metadata).get("sla") if listener.HasField("metadata") else None
    if not isinstance(sla, dict):
        return set()
    required = sla.get("mtls") in ("strict", "permissive")
    names = {
        sla.get("mtls_cert") or ("default" if required else None),
        sla.get("mtls_trust") or ("ROOTCA" if required else None),
    }
    return {name for name in names if isinstance(name, str) and name}


def cluster_secret_names(cluster: cluster_pb2.Cluster) -> set[str]:
    sockets = [m.transport_socket for m in cluster.transport_socket_matches]
    if cluster.HasField("transport_socket"):
        sockets.append(cluster.transport_socket)
    return _names(sockets)
