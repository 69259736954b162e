"""Which destinations HBONE carries, to which peer node, and who the local workloads are. Pure.

The node's HBONE settings name its local workloads (pod address -> SPIFFE ID, what a pod informer or the
workload API would give) and its peers: each peer node's HBONE address and the pod CIDRs it hosts (the
per-node pod CIDR of Kubernetes' `node.spec.podCIDRs`, or Istio's EDS endpoint with `tunnel: H2`). A
destination inside a peer's CIDR is tunnelled to that peer; anything else is not HBONE's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from planemesh.agent.hbone.protocol import HBONE_PORT
from planemesh.agent.identity.spiffe import SpiffeError, parse_spiffe_id

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HboneConfigError(ValueError):
    """Bad HBONE settings; the message names the field."""


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    address: tuple[str, int]  # the peer node's HBONE listener
    cidrs: tuple[Network, ...]
    identity: str | None = None  # the SPIFFE ID the peer node's certificate must carry (None: any of our CA)


@dataclass(frozen=True, slots=True)
class Routes:
    workloads: Mapping[str, str] = field(default_factory=dict)  # local pod ip -> SPIFFE ID
    peers: tuple[Peer, ...] = ()

    def peer_for(self, dst_ip: str) -> Peer | None:
        """The peer whose most specific CIDR holds dst_ip (None: not an HBONE destination)."""
        try:
            addr = _canonical(dst_ip)
        except ValueError:
            return None
        best: tuple[int, Peer] | None = None
        for peer in self.peers:
            for net in peer.cidrs:
                if addr.version == net.version and addr in net and (best is None or net.prefixlen > best[0]):
                    best = (net.prefixlen, peer)
        return best[1] if best else None

    def peer_name(self, ip: str | None) -> str:
        """The name of the peer whose HBONE address is `ip` (an inbound connection's source), else the address."""
        if ip is None:
            return "-"
        try:
            key = str(_canonical(ip))
        except ValueError:
            return ip
        return next((p.name for p in self.peers if p.address[0] == key), key)

    def identity_of(self, src_ip: str) -> str | None:
        try:
            return self.workloads.get(str(_canonical(src_ip)))
        except ValueError:
            return None


def _canonical(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _spiffe(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise HboneConfigError(f"{where}: a SPIFFE ID string expected")
    try:
        return str(parse_spiffe_id(value))
    except SpiffeError as exc:
        raise HboneConfigError(f"{where}: {exc}") from None


def _address(value: object, where: str) -> tuple[str, int]:
    """`ip`, `ip:port`, `[v6]` or `[v6]:port` (port defaults to 15008)."""
    text = str(value)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (str(HBONE_PORT) if not rest else "?")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, str(HBONE_PORT)
    try:
        ip = str(_canonical(host))
    except ValueError:
        raise HboneConfigError(f"{where}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise HboneConfigError(f"{where}: bad port {port!r}")
    return ip, int(port)


def parse_routes(raw: Mapping[str, object], cidrs_required: bool = True) -> Routes:
    """`workloads: {ip: spiffe}`, `peers: [{name, address, cidrs, identity?}]` -> Routes (errors name the field).
    `cidrs_required=False`: a peer may list none (its workloads' addresses come from WDS)."""
    workloads: dict[str, str] = {}
    raw_workloads = raw.get("workloads") or {}
    if not isinstance(raw_workloads, Mapping):
        raise HboneConfigError("workloads: a mapping of pod address -> SPIFFE ID expected")
    for ip, ident in raw_workloads.items():
        try:
            key = str(_canonical(str(ip)))
        except ValueError:
            raise HboneConfigError(f"workloads[{ip}]: not an IP address") from None
        workloads[key] = _spiffe(ident, f"workloads[{ip}]")
    peers = []
    raw_peers = raw.get("peers") or []
    if not isinstance(raw_peers, list):
        raise HboneConfigError("peers: a list expected")
    for i, item in enumerate(raw_peers):
        where = f"peers[{i}]"
        if not isinstance(item, Mapping):
            raise HboneConfigError(f"{where}: a mapping expected")
        unknown = set(item) - {"name", "address", "cidrs", "identity"}
        if unknown:
            raise HboneConfigError(f"{where}.{sorted(unknown)[0]}: unknown field")
        cidrs = []
        for j, cidr in enumerate(item.get("cidrs") or []):
            try:
                cidrs.append(ipaddress.ip_network(str(cidr), strict=False))
            except ValueError:
                raise HboneConfigError(f"{where}.cidrs[{j}]: {cidr!r} is not an IP prefix") from None
        if not cidrs and cidrs_required:
            raise HboneConfigError(f"{where}.cidrs: at least one pod CIDR expected")
        if "address" not in item:
            raise HboneConfigError(f"{where}.address: required")
        ident = _spiffe(item["identity"], f"{where}.identity") if item.get("identity") else None
        name = str(item.get("name") or f"peer-{i}")
        peers.append(Peer(name, _address(item["address"], f"{where}.address"), tuple(cidrs), ident))
    return Routes(workloads, tuple(peers))
