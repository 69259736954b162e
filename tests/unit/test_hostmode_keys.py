"""The host-mode map key/value codecs (struct formats on the per-connection path) against the ctypes ABI
mirror (itself checked against what bcc compiled in tests/bpf/test_hostmode_abi.py)."""

from __future__ import annotations

import ctypes
import ipaddress
import socket

import pytest

from planemesh.ebpf import abi
from planemesh.ebpf.host_redirect import _peer_key, decode_orig


def _mirror_peer(family: int, port: int, packed: bytes) -> bytes:
    key = abi.PmHostPeer()
    key.family, key.port = family, port
    ctypes.memmove(key.addr, packed, len(packed))
    return bytes(key)


@pytest.mark.parametrize(
    ("peer", "family", "packed"),
    [
        ("127.0.0.1", abi.PM_FAMILY_V4, bytes([127, 0, 0, 1])),
        ("::ffff:127.0.0.1", abi.PM_FAMILY_V4, bytes([127, 0, 0, 1])),  # v4-mapped keys as IPv4, like sock_ops
        ("::1", abi.PM_FAMILY_V6, ipaddress.ip_address("::1").packed),
        ("fe80::1%lo", abi.PM_FAMILY_V6, ipaddress.ip_address("fe80::1").packed),
        ("fd00:18:1::5", abi.PM_FAMILY_V6, ipaddress.ip_address("fd00:18:1::5").packed),
    ],
)
def test_peer_key_matches_the_abi_mirror(peer: str, family: int, packed: bytes) -> None:
    assert _peer_key(peer, 40001) == _mirror_peer(family, 40001, packed)


@pytest.mark.parametrize("peer", ["not an address", "1.2.3", "::ffff::1", ""])
def test_malformed_peers_raise_oserror(peer: str) -> None:
    with pytest.raises(OSError):
        _peer_key(peer, 1)


@pytest.mark.parametrize(("address", "family"), [("198.18.1.2", abi.PM_FAMILY_V4), ("fd00:18:1::2", abi.PM_FAMILY_V6)])
def test_decode_orig_matches_the_abi_mirror(address: str, family: int) -> None:
    orig = abi.PmHostOrig()
    packed = ipaddress.ip_address(address).packed
    orig.family, orig.port, orig.plane_id = family, socket.htons(8080), 7
    ctypes.memmove(orig.addr, packed, len(packed))
    assert decode_orig(bytes(orig)) == (address, 8080, 7)
