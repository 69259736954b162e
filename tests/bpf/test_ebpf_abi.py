"""The ctypes mirror (planemesh.ebpf.abi) against what bcc compiled from pm_abi.h: sizes and the
offset of every field, for every map key and value; and the loaded maps' sizes (kernel map info on the
fds the Datapath holds) against the mirror."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import pytest

from planemesh.ebpf import abi, libbpf
from planemesh.ebpf.loader import MAP_LAYOUTS, program_spec
from tests.bpf.conftest import compile_here

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
    "pm_src_policy": ("pm_src_policy_key", "pm_policy_val"),
}


def _layout(ctype: type) -> tuple[int, list[tuple[str, int, int]]]:
    fields = getattr(ctype, "_fields_", [])
    return ctypes.sizeof(ctype), [(f[0], getattr(ctype, f[0]).offset, getattr(ctype, f[0]).size) for f in fields]


@pytest.fixture(scope="module")
def compiled() -> Iterator[Any]:
    bpf = compile_here(program_spec(None))
    try:
        yield bpf
    finally:
        bpf.cleanup()


@pytest.mark.parametrize("map_name", sorted(MAPS))
def test_mirror_matches_compiled_layout(compiled, map_name: str) -> None:
    table = compiled[map_name.encode()]
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
    entries = {name: libbpf.map_info(datapath.map_fd(name))[4] for name in MAPS}
    assert entries == {
        "pm_planes": abi.PM_MAX_PLANES,
        "pm_counters": abi.PM_CNT_ENTRIES,
        "pm_ifaces": abi.PM_MAX_IFACES,
        "pm_policy": abi.PM_MAX_POLICY,
        "pm_dests": abi.PM_MAX_DESTS,
        "pm_forward": abi.PM_MAX_PLANES,
        "pm_config": 1,
        "pm_src_policy": abi.PM_MAX_SRC_POLICY,
    }


@pytest.mark.parametrize("map_name", sorted(MAPS))
def test_loaded_maps_have_the_mirror_key_and_value_sizes(datapath, map_name: str) -> None:
    """What the agent checks at load time (MAP_LAYOUTS), on the maps the helper process handed over."""
    key_size, value_type = MAP_LAYOUTS[map_name]
    info = libbpf.map_info(datapath.map_fd(map_name))
    assert (info[2], info[3]) == (key_size, ctypes.sizeof(value_type))


def test_loader_wrote_the_abi_version(datapath) -> None:
    raw = libbpf.map_lookup(datapath.map_fd("pm_config"), bytes(4), ctypes.sizeof(abi.PmConfig))
    assert raw is not None
    cfg = abi.PmConfig.from_buffer_copy(raw)
    assert (cfg.abi_version, cfg.local_mark, cfg.own_mark) == (abi.PM_ABI_VERSION, abi.PM_MARK_LOCAL, abi.PM_MARK_OWN)
