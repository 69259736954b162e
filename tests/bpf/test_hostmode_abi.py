"""The host-mode ctypes mirror (abi.HOST_STRUCTS) against what bcc compiled from pm_abi.h for pm_host.c."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import pytest

from planemesh.ebpf import abi, libbpf
from planemesh.ebpf.host_redirect import MAP_LAYOUTS, program_spec
from tests.bpf.conftest import compile_here

pytestmark = pytest.mark.bpf

# map name -> (C key type name or None for a scalar, C value type name)
MAPS = {
    "pm_host_dest": ("pm_dest_key", "pm_dest_val"),
    "pm_host_policy": ("pm_policy_key", "pm_policy_val"),
    "pm_host_planes": (None, "pm_plane"),
    "pm_host_by_cookie": (None, "pm_host_orig"),
    "pm_host_by_peer": ("pm_host_peer", "pm_host_orig"),
}
ALL = {**abi.STRUCTS, **abi.HOST_STRUCTS}


def _layout(ctype: type) -> tuple[int, list[tuple[str, int, int]]]:
    fields = getattr(ctype, "_fields_", [])
    return ctypes.sizeof(ctype), [(f[0], getattr(ctype, f[0]).offset, getattr(ctype, f[0]).size) for f in fields]


@pytest.fixture(scope="module")
def host() -> Iterator:
    from planemesh.ebpf.host_redirect import HostMode

    mode = HostMode()  # loaded, never attached
    try:
        yield mode
    finally:
        mode.close()


@pytest.fixture(scope="module")
def compiled() -> Iterator:
    bpf = compile_here(program_spec(abi.PM_MARK_OWN, None))
    try:
        yield bpf
    finally:
        bpf.cleanup()


@pytest.mark.parametrize("map_name", sorted(MAPS))
def test_host_mirror_matches_compiled_layout(compiled, map_name: str) -> None:
    table = compiled[map_name.encode()]
    key_name, leaf_name = MAPS[map_name]
    assert _layout(table.Leaf) == _layout(ALL[leaf_name])
    if key_name is not None:
        assert _layout(table.Key) == _layout(ALL[key_name])


def test_every_host_struct_is_a_map_type() -> None:
    assert {n for pair in MAPS.values() for n in pair if n} >= set(abi.HOST_STRUCTS)


def test_host_map_sizes(host) -> None:
    """On the maps the helper process handed over: entries and the key/value sizes the agent checks."""
    info = {name: libbpf.map_info(host._tables[name].fd) for name in MAPS}
    assert info["pm_host_dest"][4] == abi.PM_HOST_MAX_DEST
    assert info["pm_host_by_peer"][4] == abi.PM_HOST_MAX_CONNS
    assert info["pm_host_planes"][4] == abi.PM_MAX_PLANES
    for name, (key_size, value_type) in MAP_LAYOUTS.items():
        assert (info[name][2], info[name][3]) == (key_size, ctypes.sizeof(value_type)), name
