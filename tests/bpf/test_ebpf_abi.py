"""The ctypes mirror (planemesh.ebpf.abi) against what bcc compiled from pm_abi.h: sizes and the
offset of every field, for every map key and value."""

from __future__ import annotations

import ctypes

import pytest

from planemesh.ebpf import abi

pytestmark = pytest.mark.bpf

# map name -> (C key type name or None for scalar u32, C value type name)
MAPS = {
    "pm_ifaces": (None, "pm_iface"),
    "pm_planes": (None, "pm_plane"),
    "pm_policy": ("pm_policy_key", "pm_policy_val"),
    "pm_counters": (None, "pm_counter"),
    "pm_config": (None, "pm_config"),
    "pm_dests": ("pm_dest_key", "pm_dest_val"),
    "pm_forward": (None, "pm_forward"),
}


def _layout(ctype: type) -> tuple[int, list[tuple[str, int, int]]]:
    fields = getattr(ctype, "_fields_", [])
    return ctypes.sizeof(ctype), [(f[0], getattr(ctype, f[0]).offset, getattr(ctype, f[0]).size) for f in fields]


@pytest.mark.parametrize("map_name", sorted(MAPS))
def test_mirror_matches_compiled_layout(datapath, map_name: str) -> None:
    table = datapath.bpf[map_name.encode()]
    key_name, leaf_name = MAPS[map_name]
    leaf = table.Leaf
    if map_name == "pm_counters":  # per-CPU: bcc's Leaf is an array of the value type
        leaf = leaf._type_
    assert _layout(leaf) == _layout(abi.STRUCTS[leaf_name])
    if key_name is None:
        assert ctypes.sizeof(table.Key) == 4
    else:
        assert _layout(table.Key) == _layout(abi.STRUCTS[key_name])


def test_every_mirrored_struct_is_a_map_type() -> None:
    assert {name for pair in MAPS.values() for name in pair if name} == set(abi.STRUCTS)


def test_map_sizes_match_the_abi(datapath) -> None:
    assert datapath.bpf[b"pm_planes"].max_entries == abi.PM_MAX_PLANES
    assert datapath.bpf[b"pm_counters"].max_entries == abi.PM_CNT_ENTRIES
    assert datapath.bpf[b"pm_ifaces"].max_entries == abi.PM_MAX_IFACES
    assert datapath.bpf[b"pm_policy"].max_entries == abi.PM_MAX_POLICY
    assert datapath.bpf[b"pm_dests"].max_entries == abi.PM_MAX_DESTS
    assert datapath.bpf[b"pm_forward"].max_entries == abi.PM_MAX_PLANES


def test_loader_wrote_the_abi_version(datapath) -> None:
    cfg = datapath.bpf[b"pm_config"][ctypes.c_uint(0)]
    assert (cfg.abi_version, cfg.local_mark, cfg.own_mark) == (abi.PM_ABI_VERSION, abi.PM_MARK_LOCAL, abi.PM_MARK_OWN)
