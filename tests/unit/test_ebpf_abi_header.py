"""pm_abi.h's enums and constants against the Python mirror (text-level: no compiler needed)."""

from __future__ import annotations

import re

import pytest

from planemesh.ebpf import abi
from planemesh.model.planes import MAX_PLANES

HEADER = abi.HEADER.read_text()


def _enum(prefix: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(rf"\b{prefix}_(\w+)\s*=\s*(\d+)\s*,", HEADER)}


def _defines() -> dict[str, int]:
    found = {}
    for m in re.finditer(r"^#define (PM_\w+) \(?([0-9a-fx]+)u?\)?\s", HEADER, re.M):
        found[m[1]] = int(m[2], 0)
    return found


def test_actions_mirror_the_header() -> None:
    assert _enum("PM_ACT") == {a.name: a.value for a in abi.Action}


def test_reasons_mirror_the_header() -> None:
    assert _enum("PM_RSN") == {r.name: r.value for r in abi.Reason}


def test_actions_and_reasons_share_no_counter_slot() -> None:
    slots = [a.value for a in abi.Action] + [r.value for r in abi.Reason]
    assert len(slots) == len(set(slots))
    assert max(slots) < abi.PM_CNT_SLOTS


@pytest.mark.parametrize("name", sorted(_defines()))
def test_numeric_defines_mirror_the_header(name: str) -> None:
    assert getattr(abi, name) == _defines()[name]


def test_numeric_defines_are_found() -> None:
    assert {"PM_ABI_VERSION", "PM_MAX_PLANES", "PM_MARK_LOCAL", "PM_MARK_OWN", "PM_CNT_SLOTS"} <= set(_defines())


def test_max_planes_mirrors_the_plane_model() -> None:
    assert abi.PM_MAX_PLANES == MAX_PLANES


def test_marks_do_not_overlap() -> None:
    assert not abi.PM_MARK_LOCAL & abi.PM_MARK_OWN
    assert not (abi.PM_MARK_LOCAL | abi.PM_MARK_OWN) & abi.PM_MARK_PLANE_MASK
    assert abi.PM_MAX_PLANES - 1 == abi.PM_MARK_PLANE_MASK


@pytest.mark.parametrize(
    ("plane", "port", "network", "prefixlen"),
    [
        (1, 80, None, 32),
        (5, 8080, "198.18.9.0/24", 64 + 24),
        (63, 443, "fd00:18:9::/64", 64 + 64),
        (2, 1, "198.18.1.7/32", 96),
        (2, 65535, "::/0", 64),
    ],
)
def test_policy_key_roundtrip(plane: int, port: int, network: str | None, prefixlen: int) -> None:
    raw = abi.policy_key_bytes(plane, port, network)
    assert len(raw) == 28
    assert abi.PmPolicyKey.from_buffer_copy(raw).prefixlen == prefixlen
    assert raw[4:8] == plane.to_bytes(2, "big") + port.to_bytes(2, "big")  # network order
    assert abi.decode_policy_key(raw) == (plane, port, network)


@pytest.mark.parametrize(("plane", "port", "network"), [(0, 80, None), (64, 80, None), (1, 0, None), (1, 70000, None),
                                                        (1, 80, "not-a-net"), (1, 80, "198.18.0.0/33")])
def test_policy_key_rejects_bad_input(plane: int, port: int, network: str | None) -> None:
    with pytest.raises(ValueError):
        abi.policy_key_bytes(plane, port, network)


def test_slot_names() -> None:
    assert abi.slot_name(2) == "proxy"
    assert abi.slot_name(10) == "no_listener"
    assert abi.slot_name(31) == "31"
