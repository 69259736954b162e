"""STRICT_DNS / LOGICAL_DNS clusters (istiod: ServiceEntry with `resolution: DNS`) -> DnsSettings.

The hosts keep their names; agent/proxy/dns.py resolves them in each worker with the system resolver and
re-resolves at dns_refresh_rate, so their addresses change without a new snapshot. Custom resolvers
(dns_resolvers, typed_dns_resolver_config...) are refused: planemesh asks the system resolver only.
"""

from __future__ import annotations

import re

from envoy.config.cluster.v3 import cluster_pb2

from planemesh.model.config import ClusterKind, ConfigError, DnsSettings, Endpoint
from planemesh.xds.translate_common import _canonical_ip, note_ignored, only, opt_seconds

C = cluster_pb2.Cluster
DNS_KINDS = {C.STRICT_DNS: ClusterKind.STRICT_DNS, C.LOGICAL_DNS: ClusterKind.LOGICAL_DNS}
DNS_FIELDS = {"dns_refresh_rate", "dns_failure_refresh_rate", "respect_dns_ttl", "dns_lookup_family", "dns_jitter"}
_FAMILIES = {C.AUTO: "auto", C.V4_ONLY: "v4", C.V6_ONLY: "v6", C.V4_PREFERRED: "v4_preferred", C.ALL: "all"}
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
ENVOY_REFRESH_S = 5.0  # Envoy's dns_refresh_rate default
WHY_TTL = (
    "respect_dns_ttl: the system resolver does not report a record's TTL; planemesh re-resolves at "
    "dns_refresh_rate (a caching resolver on the node honours the TTL in between)"
)


def host_name(value: str, path: str) -> str:
    """An IP literal (canonical) or a DNS name (RFC 1123 labels, `_` allowed as in SRV-style names)."""
    ip = _canonical_ip(value)
    if ip is not None:
        return ip
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ConfigError(path, f"{value!r} is neither an IP address nor a valid DNS name")
    return name.lower()


def dns_address(address, path: str) -> tuple[str, int]:
    """An endpoint address of a DNS cluster: (host name or IP, port)."""
    if address.WhichOneof("address") != "socket_address":
        raise ConfigError(path, "a DNS cluster's endpoints need a socket_address with a host name")
    sa = address.socket_address
    only(sa, {"address", "port_value", "protocol", "ipv4_compat"}, f"{path}.socket_address")
    if sa.protocol != 0:
        raise ConfigError(f"{path}.socket_address.protocol", "only TCP is supported")
    if not 1 <= sa.port_value <= 65535:
        raise ConfigError(f"{path}.socket_address.port_value", f"{sa.port_value} is not a TCP port")
    return host_name(sa.address, f"{path}.socket_address.address"), sa.port_value


def dns_settings(cluster, kind: ClusterKind, hosts: tuple[Endpoint, ...], path: str) -> DnsSettings:
    if not hosts:
        raise ConfigError(f"{path}.load_assignment", f"a {kind.name} cluster needs at least one host")
    if kind is ClusterKind.LOGICAL_DNS and (len(hosts) != 1 or len(cluster.load_assignment.endpoints) != 1):
        raise ConfigError(
            f"{path}.load_assignment",
            "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
        )
    refresh = opt_seconds(cluster, "dns_refresh_rate")
    if refresh is not None and refresh <= 0.001:
        raise ConfigError(f"{path}.dns_refresh_rate", "must be greater than 1ms")
    failure = None
    if cluster.HasField("dns_failure_refresh_rate"):
        rate = cluster.dns_failure_refresh_rate
        only(rate, {"base_interval", "max_interval"}, f"{path}.dns_failure_refresh_rate")
        failure = opt_seconds(rate, "base_interval")
        if failure is None or failure <= 0.001:
            raise ConfigError(f"{path}.dns_failure_refresh_rate.base_interval", "must be greater than 1ms")
    family = _FAMILIES.get(cluster.dns_lookup_family)
    if family is None:
        raise ConfigError(f"{path}.dns_lookup_family", f"unknown family {cluster.dns_lookup_family}")
    if cluster.respect_dns_ttl:
        note_ignored(f"{path}.respect_dns_ttl", WHY_TTL)
    if cluster.HasField("dns_jitter"):
        note_ignored(f"{path}.dns_jitter", "spreads refreshes over time only; planemesh refreshes at the exact rate")
    return DnsSettings(
        hosts=hosts,
        refresh_s=refresh or ENVOY_REFRESH_S,
        failure_refresh_s=failure,
        respect_ttl=cluster.respect_dns_ttl,
        family=family,
    )
