"""The Python mirror of ebpf/pm_abi.h: constants, enums and ctypes structs, defined once.

tests/bpf/test_ebpf_abi.py compares every struct's size and field offsets with the types bcc
generated from the C header, and every enum/constant with the header's text, so this file cannot
silently drift. Byte order: fields documented as NETWORK order in the header are filled big-endian
by the helpers here; everything else is host order.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from collections.abc import Iterable
from enum import IntEnum
from pathlib import Path

from planemesh.ebpf.abi_marks import PM_MARK_LOCAL as PM_MARK_LOCAL  # re-exported: the header's mirror is here
from planemesh.ebpf.abi_marks import PM_MARK_OWN as PM_MARK_OWN
from planemesh.ebpf.abi_marks import PM_MARK_PLANE_MASK as PM_MARK_PLANE_MASK

HEADER = Path(__file__).with_name("pm_abi.h")

PM_ABI_VERSION = 1
PM_MAX_PLANES = 64
PM_MAX_IFACES = 4096
PM_MAX_POLICY = 65536
PM_MAX_DESTS = 16384
PM_MAX_SRC_POLICY = 131072
PM_CNT_SLOTS = 32
PM_CNT_ENTRIES = PM_MAX_PLANES * PM_CNT_SLOTS

# PM_MARK_PLANE_MASK, PM_MARK_LOCAL, PM_MARK_OWN: in abi_marks.py (a worker's, without ctypes), imported above.

PM_IF_F_CLSACT_OURS = 0x1
PM_IF_F_ATTACHED = 0x2
PM_PLANE_F_FAIL_CLOSED = 0x1
PM_PLANE_F_ACTIVE = 0x2
PM_PLANE_F_NO_ORPHANS = 0x4

PM_POLICY_PORT_BITS = 32
PM_POLICY_ADDR_OFFSET_BITS = 64
PM_SRC_POLICY_DADDR_OFFSET_BITS = 192
PM_CFG_F_SRC_POLICY = 0x1
PM_FAMILY_V4 = 4
PM_FAMILY_V6 = 6

PM_HTB_MAJOR = 0x504D
PM_HTB_ROOT_MINOR = 0x1
PM_HTB_PLANE_MINOR_BASE = 0x100
PM_HTB_DEFAULT_MINOR = 0xFFFF

PM_DEST_ADDR_OFFSET_BITS = 32
PM_HOST_MAX_DEST = 16384
PM_HOST_MAX_CONNS = 65536


class Action(IntEnum):
    """enum pm_action: a contract, never renumber."""

    NONE = 0
    BYPASS = 1
    PROXY = 2
    SNIFF = 3
    DROP = 4


class Reason(IntEnum):
    """enum pm_reason: counter slots beside the actions; a contract, never renumber."""

    NOT_IP = 5
    NOT_TCP = 6
    FRAGMENT = 7
    PARSE_ERROR = 8
    OWN_TRAFFIC = 9
    NO_LISTENER = 10
    ESTABLISHED = 11
    LISTENER = 12
    NO_SOCKET = 13
    ASSIGN_FAILED = 14
    NO_PLANE = 15
    UNCONFIGURED = 16
    CROSS_PLANE_DROP = 17
    CROSS_PLANE = 18
    LISTENER_PORT_DROP = 19


def slot_name(slot: int) -> str:
    """A counter slot's name ('proxy', 'no_listener', ...) or its number if unknown."""
    for enum in (Action, Reason):
        try:
            return enum(slot).name.lower()
        except ValueError:
            continue
    return str(slot)


class PmIface(ctypes.Structure):
    _fields_ = [("plane_id", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class PmPlane(ctypes.Structure):
    _fields_ = [
        ("proxy_port", ctypes.c_uint16),
        ("sniff_port", ctypes.c_uint16),
        ("undeclared_action", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class PmPolicyKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("plane_id", ctypes.c_uint16),  # network order
        ("dst_port", ctypes.c_uint16),  # network order
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("addr", ctypes.c_uint8 * 16),  # network order
    ]


class PmSrcPolicyKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("plane_id", ctypes.c_uint16),  # network order
        ("dst_port", ctypes.c_uint16),  # network order
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("saddr", ctypes.c_uint8 * 16),  # network order
        ("daddr", ctypes.c_uint8 * 16),  # network order
    ]


class PmPolicyVal(ctypes.Structure):
    _fields_ = [("action", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class PmCounter(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class PmConfig(ctypes.Structure):
    _fields_ = [
        ("abi_version", ctypes.c_uint32),
        ("local_mark", ctypes.c_uint32),
        ("local_mask", ctypes.c_uint32),
        ("own_mark", ctypes.c_uint32),
        ("own_mask", ctypes.c_uint32),
        ("plane_mask", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class PmDestKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("addr", ctypes.c_uint8 * 16),  # network order
    ]


class PmDestVal(ctypes.Structure):
    _fields_ = [("plane_id", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class PmForward(ctypes.Structure):
    _fields_ = [("planes", ctypes.c_uint64)]  # bit P: may open connections to plane P's addresses


class PmHostOrig(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("port", ctypes.c_uint16),  # network order
        ("plane_id", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),  # network order
    ]


class PmHostPeer(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("port", ctypes.c_uint16),  # host order
        ("addr", ctypes.c_uint8 * 16),  # network order
    ]


# C struct name -> mirror, for the ABI test and for converting bcc's generated types.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "pm_iface": PmIface,
    "pm_plane": PmPlane,
    "pm_policy_key": PmPolicyKey,
    "pm_policy_val": PmPolicyVal,
    "pm_src_policy_key": PmSrcPolicyKey,
    "pm_counter": PmCounter,
    "pm_config": PmConfig,
    "pm_dest_key": PmDestKey,  # also host mode's pm_host_dest
    "pm_dest_val": PmDestVal,
    "pm_forward": PmForward,
}

# Host-mode types (pm_host.c's maps), checked by tests/bpf/test_hostmode_abi.py.
HOST_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "pm_host_orig": PmHostOrig,
    "pm_host_peer": PmHostPeer,
}


def htb_classid(minor: int) -> int:
    """The full tc class id PM_HTB_MAJOR:minor."""
    return (PM_HTB_MAJOR << 16) | (minor & 0xFFFF)


def plane_classid(plane_id: int) -> int:
    """The HTB class the egress classifier picks for plane_id (see pm_egress.c)."""
    return htb_classid(PM_HTB_PLANE_MINOR_BASE + plane_id)


def dest_key_bytes(network: str) -> bytes:
    """The bytes of a pm_dest_key for a plane CIDR. Raises ValueError on a malformed network."""
    net = ipaddress.ip_network(network, strict=False)
    key = PmDestKey()
    key.family = PM_FAMILY_V4 if net.version == 4 else PM_FAMILY_V6
    key.prefixlen = PM_DEST_ADDR_OFFSET_BITS + net.prefixlen
    packed = net.network_address.packed
    ctypes.memmove(key.addr, packed, len(packed))
    return bytes(key)


def decode_dest_key(raw: bytes) -> str:
    """Inverse of dest_key_bytes: the CIDR."""
    key = PmDestKey.from_buffer_copy(raw)
    size = 4 if key.family == PM_FAMILY_V4 else 16
    addr = ipaddress.ip_address(bytes(key.addr[:size]))
    return str(ipaddress.ip_network(f"{addr}/{key.prefixlen - PM_DEST_ADDR_OFFSET_BITS}", strict=False))


def forward_mask(plane_ids: Iterable[int]) -> int:
    """struct pm_forward's bit set for these plane ids. Raises ValueError outside 1..PM_MAX_PLANES-1."""
    mask = 0
    for plane_id in plane_ids:
        if not 1 <= plane_id < PM_MAX_PLANES:
            raise ValueError(f"plane id {plane_id} is outside 1..{PM_MAX_PLANES - 1}")
        mask |= 1 << plane_id
    return mask


def policy_key_bytes(plane_id: int, port: int, network: str | None) -> bytes:
    """The bytes of a pm_policy_key: a (plane, port) rule when network is None, else a prefix rule.

    Raises ValueError on an out-of-range plane/port or a malformed network.
    """
    if not 1 <= plane_id < PM_MAX_PLANES:
        raise ValueError(f"plane id {plane_id} is outside 1..{PM_MAX_PLANES - 1}")
    if not 1 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port")
    key = PmPolicyKey()
    key.plane_id = socket.htons(plane_id)
    key.dst_port = socket.htons(port)
    if network is None:
        key.prefixlen = PM_POLICY_PORT_BITS
        return bytes(key)
    net = ipaddress.ip_network(network, strict=False)
    key.family = PM_FAMILY_V4 if net.version == 4 else PM_FAMILY_V6
    key.prefixlen = PM_POLICY_ADDR_OFFSET_BITS + net.prefixlen
    packed = net.network_address.packed
    ctypes.memmove(key.addr, packed, len(packed))
    return bytes(key)


def decode_policy_key(raw: bytes) -> tuple[int, int, str | None]:
    """Inverse of policy_key_bytes: (plane_id, port, network or None)."""
    key = PmPolicyKey.from_buffer_copy(raw)
    plane_id, port = socket.ntohs(key.plane_id), socket.ntohs(key.dst_port)
    if key.prefixlen <= PM_POLICY_PORT_BITS:
        return plane_id, port, None
    plen = key.prefixlen - PM_POLICY_ADDR_OFFSET_BITS
    size = 4 if key.family == PM_FAMILY_V4 else 16
    addr = ipaddress.ip_address(bytes(key.addr[:size]))
    return plane_id, port, str(ipaddress.ip_network(f"{addr}/{plen}", strict=False))


def src_policy_key_bytes(plane_id: int, port: int, source: str, network: str | None) -> bytes:
    """The bytes of a pm_src_policy_key: `source` (a whole address) to `network` (None: any destination of the
    source's family). Raises ValueError on an out-of-range plane/port, a malformed address or network, or a
    network of the other family."""
    if not 1 <= plane_id < PM_MAX_PLANES:
        raise ValueError(f"plane id {plane_id} is outside 1..{PM_MAX_PLANES - 1}")
    if not 1 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port")
    src = ipaddress.ip_address(source)
    key = PmSrcPolicyKey()
    key.plane_id = socket.htons(plane_id)
    key.dst_port = socket.htons(port)
    key.family = PM_FAMILY_V4 if src.version == 4 else PM_FAMILY_V6
    ctypes.memmove(key.saddr, src.packed, len(src.packed))
    key.prefixlen = PM_SRC_POLICY_DADDR_OFFSET_BITS
    if network is not None:
        net = ipaddress.ip_network(network, strict=False)
        if net.version != src.version:
            raise ValueError(f"{network} and source {source} are of different families")
        key.prefixlen += net.prefixlen
        ctypes.memmove(key.daddr, net.network_address.packed, len(net.network_address.packed))
    return bytes(key)


def decode_src_policy_key(raw: bytes) -> tuple[int, int, str, str | None]:
    """Inverse of src_policy_key_bytes: (plane_id, port, source, network or None)."""
    key = PmSrcPolicyKey.from_buffer_copy(raw)
    size = 4 if key.family == PM_FAMILY_V4 else 16
    source = str(ipaddress.ip_address(bytes(key.saddr[:size])))
    plen = key.prefixlen - PM_SRC_POLICY_DADDR_OFFSET_BITS
    if plen <= 0:
        return socket.ntohs(key.plane_id), socket.ntohs(key.dst_port), source, None
    addr = ipaddress.ip_address(bytes(key.daddr[:size]))
    return socket.ntohs(key.plane_id), socket.ntohs(key.dst_port), source, str(ipaddress.ip_network(f"{addr}/{plen}"))
