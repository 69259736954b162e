"""A sans-IO reader of the rtnetlink messages the agent watches: links, addresses and routes (no pyroute2).

The long-lived agent only needs to know which links exist (name, up), their global addresses and the host routes
through them (`@routed` planes), and to hear when that changes. `dump_request` builds the RTM_GET* dump requests,
`parse` turns a buffer from a NETLINK_ROUTE socket (dump replies or multicast events) into typed messages; every
other message type is skipped. Changes to the kernel (rules, routes, tc) go through pyroute2 in a short-lived
helper (netplanes/nl_helper.py). A truncated or malformed message ends the parse of its buffer, never raises.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
IFLA_IFNAME = 3
IFA_ADDRESS = 1
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
IFF_UP = 0x1
RT_TABLE_MAIN = 254

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTATTR = struct.Struct("=HH")
_RTGENMSG = struct.Struct("=Bxxx")


@dataclass(frozen=True, slots=True)
class Link:
    ifindex: int
    ifname: str
    up: bool
    gone: bool = False  # RTM_DELLINK


@dataclass(frozen=True, slots=True)
class Addr:
    ifindex: int
    address: str
    scope: int
    gone: bool = False  # RTM_DELADDR


@dataclass(frozen=True, slots=True)
class Route:
    family: int
    table: int
    dst: str | None
    dst_len: int
    oif: int | None
    gone: bool = False  # RTM_DELROUTE


@dataclass(frozen=True, slots=True)
class Done:
    seq: int
    error: int = 0  # NLMSG_ERROR: -errno from the kernel (0: an ACK)


Message = Link | Addr | Route | Done


def dump_request(msg_type: int, seq: int, family: int = socket.AF_UNSPEC) -> bytes:
    """An RTM_GETLINK / RTM_GETADDR / RTM_GETROUTE dump request of every object of `family`."""
    if msg_type not in (RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE):
        raise ValueError(f"not a dump this reader parses: {msg_type}")
    body = _RTGENMSG.pack(family) if msg_type != RTM_GETLINK else _IFINFOMSG.pack(family, 0, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _align(n: int) -> int:
    return (n + 3) & ~3


def attributes(data: bytes | memoryview, offset: int) -> dict[int, bytes]:
    """rtattr type -> payload from `offset` to the end of `data` (the first of a repeated type wins)."""
    attrs: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            break
        attrs.setdefault(kind & 0x3FFF, bytes(data[offset + _RTATTR.size : offset + length]))  # NLA_F_* bits off
        offset += _align(length)
    return attrs


def _address(family: int, raw: bytes | None) -> str | None:
    if raw is None:
        return None
    if family == socket.AF_INET and len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if family == socket.AF_INET6 and len(raw) == 16:
        return str(ipaddress.IPv6Address(raw))
    return None


def _u32(raw: bytes | None) -> int | None:
    return struct.unpack("=I", raw)[0] if raw is not None and len(raw) == 4 else None


def _link(msg_type: int, body: memoryview) -> Link | None:
    if len(body) < _IFINFOMSG.size:
        return None
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(body)
    name = attributes(body, _IFINFOMSG.size).get(IFLA_IFNAME, b"").split(b"\0", 1)[0]
    return Link(index, name.decode(errors="replace"), bool(flags & IFF_UP), msg_type == RTM_DELLINK)


def _addr(msg_type: int, body: memoryview) -> Addr | None:
    if len(body) < _IFADDRMSG.size:
        return None
    family, _plen, _flags, scope, index = _IFADDRMSG.unpack_from(body)
    address = _address(family, attributes(body, _IFADDRMSG.size).get(IFA_ADDRESS))
    return Addr(index, address, scope, msg_type == RTM_DELADDR) if address is not None else None


def _route(msg_type: int, body: memoryview) -> Route | None:
    if len(body) < _RTMSG.size:
        return None
    family, dst_len, _src, _tos, table, _proto, _scope, _type, _flags = _RTMSG.unpack_from(body)
    attrs = attributes(body, _RTMSG.size)
    table = _u32(attrs.get(RTA_TABLE)) or table
    dst = _address(family, attrs.get(RTA_DST))
    return Route(family, table, dst, dst_len, _u32(attrs.get(RTA_OIF)), msg_type == RTM_DELROUTE)


_BODIES = {
    RTM_NEWLINK: _link, RTM_DELLINK: _link,
    RTM_NEWADDR: _addr, RTM_DELADDR: _addr,
    RTM_NEWROUTE: _route, RTM_DELROUTE: _route,
}  # fmt: skip


def parse(data: bytes) -> list[Message]:
    """Every link/address/route message and end of dump (Done) in one datagram, in order."""
    view = memoryview(data)
    out: list[Message] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(view):
        length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(view, offset)
        if length < _NLMSGHDR.size or offset + length > len(view):
            break
        body = view[offset + _NLMSGHDR.size : offset + length]
        if msg_type == NLMSG_DONE:
            out.append(Done(seq))
        elif msg_type == NLMSG_ERROR:
            code = struct.unpack_from("=i", body)[0] if len(body) >= 4 else -1
            out.append(Done(seq, code))
        elif msg_type in _BODIES:
            parsed = _BODIES[msg_type](msg_type, body)
            if parsed is not None:
                out.append(parsed)
        offset += _align(length)
    return out


__all__ = ["Addr", "Done", "Link", "Message", "Route", "dump_request", "parse"]
