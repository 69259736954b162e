"""Cross-plane policy in the data-path view: destinations' planes and each plane's forward set. No kernel."""

from __future__ import annotations

import pytest

from planemesh.ebpf import abi
from planemesh.ebpf.policy import policy_from_snapshot
from planemesh.model.config import Snapshot
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import Plane

OAM = Plane("oam", 1, ("*-oam",), (IPNetwork("198.18.1.0/24"), IPNetwork("fd00:18:1::/64")), forward_to=("sig",))
SIG = Plane("sig", 5, ("*-sig",), (IPNetwork("198.18.5.7/24"),))
MEDIA = Plane("media", 9, ("*-media",), (IPNetwork("fd00:18:9::/64"),), forward_to=("oam", "sig"))


def test_destinations_map_every_plane_cidr_canonically() -> None:
    policy = policy_from_snapshot(Snapshot(version="t", planes=(OAM, SIG, MEDIA)))
    assert dict(policy.destinations) == {
        "198.18.1.0/24": 1, "fd00:18:1::/64": 1, "198.18.5.0/24": 5, "fd00:18:9::/64": 9,
    }  # fmt: skip


def test_forward_to_resolves_names_to_plane_ids() -> None:
    policy = policy_from_snapshot(Snapshot(version="t", planes=(OAM, SIG, MEDIA)))
    assert {p.plane_id: p.forward_to for p in policy.planes} == {1: {5}, 5: frozenset(), 9: {1, 5}}


def test_forward_mask_bits() -> None:
    assert abi.forward_mask([]) == 0
    assert abi.forward_mask([1, 5]) == 0b100010
    assert abi.forward_mask([63]) == 1 << 63
    for bad in (0, 64):
        with pytest.raises(ValueError):
            abi.forward_mask([bad])


@pytest.mark.parametrize("net", ["198.18.5.0/24", "fd00:18:9::/64", "0.0.0.0/0", "198.18.1.7/32", "::/0"])
def test_dest_key_roundtrip(net: str) -> None:
    raw = abi.dest_key_bytes(net)
    assert len(raw) == 24
    assert abi.decode_dest_key(raw) == net
