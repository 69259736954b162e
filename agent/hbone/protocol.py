"""The HBONE protocol, sans-IO: the CONNECT request a source node sends and the decision the destination takes.

A tunnel is one HTTP/2 stream: `:method CONNECT`, `:authority <destination pod ip>:<port>` (RFC 9113 8.5: no
`:scheme`, no `:path`), answered `200` before any byte flows. ztunnel also sends `forwarded: for=<source ip>`
(RFC 7239); we send it for the log, and never trust it for authorization (the TCP peer is the node).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from planemesh.agent.rbac import RbacFilter, RequestFacts, evaluate

HBONE_PORT = 15008  # Istio ambient's inbound HBONE port
ALPN = "h2"
MAX_HEADER_BYTES = 8192  # a CONNECT head is tiny; a bigger one is refused (431) before any work


class HboneError(ValueError):
    """A malformed CONNECT request; `status` is what the destination answers."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _host(ip: str) -> str:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return f"[{addr}]" if addr.version == 6 else str(addr)


def format_authority(ip: str, port: int) -> str:
    return f"{_host(ip)}:{port}"


def parse_authority(text: str) -> tuple[str, int]:
    """`ip:port` or `[ipv6]:port` -> (canonical ip, port). Names are refused: HBONE addresses a pod, not a host."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise HboneError(f"authority {text[:64]!r}: not ip:port")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise HboneError(f"authority {text[:64]!r}: {host[:48]!r} is not an IP address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise HboneError(f"authority {text[:64]!r}: bad port")
    if addr.version == 6 and "[" not in text:
        raise HboneError(f"authority {text[:64]!r}: IPv6 needs brackets")
    return str(addr), int(port_text)


def connect_headers(dst_ip: str, dst_port: int, src_ip: str | None = None) -> list[tuple[str, str]]:
    headers = [(":method", "CONNECT"), (":authority", format_authority(dst_ip, dst_port))]
    if src_ip:
        headers.append(("forwarded", f'for="{_host(src_ip)}"'))
    return headers


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    dst_ip: str
    dst_port: int
    authority: str
    headers: Mapping[str, str]


def parse_connect(headers: Iterable[tuple[str | bytes, str | bytes]]) -> ConnectRequest:
    """The request head of one stream -> ConnectRequest, or HboneError with the status to answer."""
    fields: dict[str, str] = {}
    size = 0
    for name, value in headers:
        n = name.decode("latin-1") if isinstance(name, bytes) else name
        v = value.decode("latin-1") if isinstance(value, bytes) else value
        size += len(n) + len(v) + 32
        if size > MAX_HEADER_BYTES:
            raise HboneError("request head too large", 431)
        fields[n.lower()] = v
    method = fields.get(":method", "")
    if method != "CONNECT":
        raise HboneError(f"method {method[:16]!r}: HBONE carries CONNECT only", 405)
    if ":protocol" in fields or ":path" in fields or ":scheme" in fields:
        raise HboneError("extended CONNECT (:protocol / :path / :scheme) is not HBONE")
    authority = fields.get(":authority")
    if not authority:
        raise HboneError("CONNECT without :authority")
    ip, port = parse_authority(authority)
    return ConnectRequest(ip, port, authority, fields)


class Authorizer(Protocol):
    def check(self, identity: str, dst_ip: str, dst_port: int) -> tuple[bool, str | None]: ...


@dataclass(frozen=True, slots=True)
class Decision:
    status: int  # 200: open the tunnel; else the status to answer (and close the stream)
    reason: str  # for the log and the counters: ok | unknown_destination | rbac_denied
    policy: str | None = None


def decide(
    req: ConnectRequest,
    peer: str,
    peer_ip: str,
    local_workloads: Mapping[str, str],
    rbacs: tuple[RbacFilter, ...],
    authz: Authorizer | None = None,
) -> Decision:
    """What the destination node does with an authenticated CONNECT.

    Only pods of this node are reachable (else the node would relay anywhere for any mesh identity); then every
    RBAC filter must allow the source identity `peer` (the client certificate's SPIFFE ID) to reach
    (dst_ip, dst_port). source_ip principals see the TCP peer (the source node), not the forwarded header.
    """
    if req.dst_ip not in local_workloads:
        return Decision(404, "unknown_destination")
    facts = RequestFacts(
        {":method": "CONNECT", ":authority": req.authority}, "", req.dst_ip, req.dst_port, peer_ip, peer
    )
    for rbac in rbacs:
        allowed, policy = evaluate(rbac, facts)
        if not allowed:
            return Decision(403, "rbac_denied", policy or "no ALLOW policy matched")
    if authz is not None:  # istio's Authorization policies from WDS (agent/hbone/authz.py)
        allowed, policy = authz.check(peer, req.dst_ip, req.dst_port)
        if not allowed:
            return Decision(403, "rbac_denied", policy)
    return Decision(200, "ok")
