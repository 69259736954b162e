"""A BPF map held by its fd alone: raw-bytes access through the bpf() syscall (ebpf/libbpf.py).

The layouts are the ctypes mirror's (ebpf/abi.py): `check_layout` refuses a map whose key or value size
is not what the mirror says -- a pinned map left by another layout, or a program built from another
header -- before anything is written to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from collections.abc import Mapping

from planemesh.ebpf import libbpf

# enum bpf_map_type values of the per-CPU maps (their values hold one slot per possible CPU)
_PERCPU_TYPES = frozenset({5, 6, 10, 21})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP_STORAGE
_U32 = struct.Struct("=I")


def u32_key(index: int) -> bytes:
    return _U32.pack(index)


class FdMap:
    """One map: lookups, updates, deletes and walks on bytes; `close` releases the fd."""

    def __init__(self, name: str, fd: int) -> None:
        self.name, self.fd = name, fd
        self.type, self.id, self.key_size, self.value_size, self.max_entries = libbpf.map_info(fd)
        self.percpu = self.type in _PERCPU_TYPES
        # per-CPU values: each CPU's slot is rounded up to 8 bytes (kernel's bpf_map_value_size)
        self.slot_size = (self.value_size + 7) & ~7 if self.percpu else self.value_size
        self.read_size = self.slot_size * libbpf.possible_cpus() if self.percpu else self.value_size

    def check_layout(self, key_size: int, value_type: type[ctypes.Structure] | int) -> None:
        """ValueError unless the map's key and value sizes are the mirror's."""
        value_size = value_type if isinstance(value_type, int) else ctypes.sizeof(value_type)
        if (self.key_size, self.value_size) != (key_size, value_size):
            raise ValueError(
                f"map {self.name} has key/value sizes {self.key_size}/{self.value_size},"
                f" this agent's ABI mirror says {key_size}/{value_size}"
            )

    def get(self, key: bytes) -> bytes | None:
        return libbpf.map_lookup(self.fd, key, self.read_size)

    def put(self, key: bytes, value: bytes) -> None:
        libbpf.map_update(self.fd, key, value)

    def delete(self, key: bytes) -> bool:
        return libbpf.map_delete(self.fd, key)

    def keys(self) -> list[bytes]:
        return libbpf.map_keys(self.fd, self.key_size)

    def items(self) -> list[tuple[bytes, bytes]]:
        """(key, value) pairs; a key deleted during the walk is left out."""
        found = []
        for key in self.keys():
            value = self.get(key)
            if value is not None:
                found.append((key, value))
        return found

    def __len__(self) -> int:
        return len(self.keys())

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def open_maps(fds: Mapping[str, int], layouts: Mapping[str, tuple[int, type[ctypes.Structure]]]) -> dict[str, FdMap]:
    """FdMaps for these map fds, each checked against its mirror layout (map -> (key size, value type)):
    ValueError if one differs (the caller still owns the fds then)."""
    tables = {name: FdMap(name, fd) for name, fd in fds.items()}
    for name, (key_size, value_type) in layouts.items():
        tables[name].check_layout(key_size, value_type)
    return tables


__all__ = ["FdMap", "open_maps", "u32_key"]
