"""The plane model: what a network plane is, independent of where its definition came from.

A plane is a set of interfaces (name patterns), the IPv4/IPv6 CIDRs that belong to it, its policy for
undeclared ports, and its SLA. Planes are numbered (plane_id) because the data path carries the
plane in BPF map keys and in skb->mark.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from enum import StrEnum

from planemesh.model.ip import IPAddress, IPNetwork

ROUTED = "@routed"  # interface entry: any link with a host route to one of the plane's addresses (pod veths)
MAX_PLANES = 64  # plane ids 1..63; 0 means "not a plane interface" (mirrors PM_MAX_PLANES in the ABI)
RESERVED_TABLES = frozenset({0, 253, 254, 255})  # unspec, default, main, local: never a plane's table
MAX_TABLE = 2**32 - 2  # 2^32-1 is RT_TABLE_MAX's "any table" in some tools
LOCAL_DELIVERY_TABLE = 0x504D  # 20557 ("PM"): planemesh's own table for intercepted packets (netplanes/routing.py)


class UndeclaredPorts(StrEnum):
    """What the data path does with TCP to a port no listener declared."""

    BYPASS = "bypass"  # kernel only, never seen by the agent
    SNIFF = "sniff"  # peek: HTTP goes to the L7 proxy, everything else is passed through


@dataclass(frozen=True, slots=True)
class SLA:
    """A plane's service level. Defaults are in agent/defaults.py's spirit: generous, never unbounded."""

    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    idle_timeout_s: float = 300.0
    request_headers_timeout_s: float = 10.0  # first byte of a request head -> its end (slowloris); 0 = none
    retries: int = 0
    per_try_timeout_s: float | None = None
    retry_on: frozenset[str] = frozenset({"connect-failure"})
    max_connections: int = 4096
    # One client address may hold this many of the plane's connections; None: a quarter of max_connections
    # (1024 by default). Envoy has no per-source default (only totals: global_downstream_max_connections).
    max_connections_per_source: int | None = None
    # A connection that has not sent a byte is closed after this long (0 = never); under pressure (the plane
    # above 3/4 of max_connections, or its worker over its memory soft limit) every idle connection gets
    # agent/proxy/limits.py PRESSURED_IDLE_TIMEOUT_S. Envoy: request_headers_timeout (off by default) and the
    # overload manager's reduce_timeouts action.
    idle_connection_timeout_s: float = 10.0
    # Per worker process, RSS growth over its footprint at start (about 30 MB): above 80% the worker sheds new
    # connections/requests (503) and keeps nothing alive, above 95% it resets the connections buffering most
    # (agent/proxy/overload.py). Envoy: the overload manager's fixed_heap monitor (off unless configured).
    # Also the plane's cgroup memory.max (x workers, plus kernel-side margin: model/plane_limits.py); 0 = none.
    memory_max_mb: int = 256
    max_pending_requests: int = 1024
    max_requests: int = 4096
    # Bytes buffered per connection (request body while the upstream connects, bytes held after an upgrade
    # request) before the proxy stops reading the client: Envoy's per_connection_buffer_limit_bytes default.
    buffer_limit_bytes: int = 1 << 20
    rate_limit_rps: float | None = None  # local token bucket; None = unlimited
    rate_limit_burst: int | None = None
    bandwidth_mbit: float | None = None  # HTB class rate on egress; None = no class
    # HTB prio (0 highest .. 7); also the order planes shed in when the node runs out of CPU or memory (the
    # highest never sheds: agent/node_pressure.py). Envoy: none (one overload manager for all its listeners).
    priority: int = 3
    workers: int = 1  # proxy worker processes for this plane
    cpu_weight: int = 100  # the plane's workers' CPU share (cgroup v2 cpu.weight, 1..10000), agent/cpu_groups.py
    cpus: str | None = None  # cpu list the plane's workers are pinned to (cgroup cpuset.cpus, "0-1,3"); None: any
    fail_closed: bool = False  # agent gone: drop (True) or fall through to the original destination
    # Bytes a connection may hold for a peer that does not read (Envoy: per_connection_buffer_limit_bytes, 1 MiB).
    buffer_limit_bytes: int = 1 << 20
    # HTTP/2 downstream abuse limits (agent/proxy/h2_guard.py), Envoy's http2_protocol_options defaults.
    h2_max_concurrent_streams: int = 100  # Envoy: max_concurrent_streams, 100 advised for untrusted clients
    h2_premature_reset_total_stream_count: int = 500  # Envoy: overload.premature_reset_total_stream_count
    h2_premature_reset_min_stream_lifetime_s: float = 1.0  # Envoy: ..premature_reset_min_stream_lifetime_seconds
    h2_max_outbound_control_frames: int = 1000  # Envoy: max_outbound_control_frames
    h2_max_consecutive_inbound_frames_with_empty_payload: int = 1  # Envoy: same name
    h2_max_inbound_priority_frames_per_stream: int = 100  # Envoy: same name
    h2_max_inbound_window_update_frames_per_data_frame_sent: int = 10  # Envoy: same name
    # mTLS of the plane's proxied traffic: declared HTTP ports, the sniffing listener, tcp_proxy chains, of
    # listeners that are not OUTBOUND (Istio PeerAuthentication mode, inbound only; Envoy: a DownstreamTlsContext
    # with require_client_certificate on every chain, and a raw_buffer twin for permissive): "" as the xDS
    # listeners say, "strict" (mTLS only; the kernel bypasses none of those tcp_proxy chains), "permissive"
    # (mTLS or plaintext), "disable" (TLS chains are not terminated). agent/proxy/tls.py, sniff_tls.py,
    # ebpf/policy.py apply it; a static configuration without xDS cannot (no Secrets: refused at load);
    # docs/security.md "Per plane".
    mtls: str = ""
    mtls_cert: str = "default"  # the plane's certificate: an SDS Secret by name (istio-agent's `default`)
    mtls_trust: str = "ROOTCA"  # the roots client certificates must chain to (istio-agent's `ROOTCA`)
    mtls_trust_domain: str | None = None  # clients must hold a SPIFFE ID of this trust domain; None: any


@dataclass(frozen=True, slots=True)
class Plane:
    name: str
    plane_id: int
    interfaces: tuple[str, ...]  # fnmatch patterns of (node-side) interface names
    cidrs: tuple[IPNetwork, ...]
    undeclared: UndeclaredPorts = UndeclaredPorts.BYPASS
    proxy_port: int = 15001  # this plane's transparent L7 listener ([::], dual-stack)
    sniff_port: int = 15002  # this plane's sniffing listener
    sla: SLA = field(default_factory=SLA)
    # The plane's own routing table on this node (VRF-like telecom nodes): the proxy's upstream traffic of
    # this plane is routed there (fwmark rule, netplanes/routing.py). None: the node's main table.
    table: int | None = None
    # Planes that traffic arriving on this plane may reach (destination in their CIDRs); others are refused.
    forward_to: tuple[str, ...] = ()

    def claims_interface(self, ifname: str) -> bool:
        return any(fnmatch.fnmatchcase(ifname, pattern) for pattern in self.interfaces if pattern != ROUTED)

    def contains(self, address: str | IPAddress) -> bool:
        ip = IPAddress(address) if isinstance(address, str) else address
        if ip.version == 6 and ip.is_ipv4_mapped():
            ip = ip.ipv4()
        return any(ip.version == net.version and ip in net for net in self.cidrs)


def plane_of_address(planes: tuple[Plane, ...] | list[Plane], address: str) -> Plane | None:
    """The plane whose CIDRs hold `address` (v4-mapped v6 counts as v4), or None."""
    ip = IPAddress(address.split("%", 1)[0])
    for plane in planes:
        if plane.contains(ip):
            return plane
    return None


def plane_of_interface(planes: tuple[Plane, ...] | list[Plane], ifname: str) -> Plane | None:
    for plane in planes:
        if plane.claims_interface(ifname):
            return plane
    return None
