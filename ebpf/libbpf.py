"""The bpf() calls the agent makes itself, through ctypes on libbpf.so.1 (libbcc links it, so it is there
wherever bcc is): cgroup attachment as a BPF link, the programs attached to a cgroup, pins, and map
lookups/updates/deletes/iteration on a bare map fd. The agent and its proxy workers hold only fds and
never import bcc (the compiler runs in a short-lived helper process: ebpf/build.py).

Every call raises OSError with the kernel's errno on failure.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

# enum bpf_attach_type (include/uapi/linux/bpf.h): values never change.
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11


def _open() -> ctypes.CDLL:
    """libbpf.so.1 by its soname; ctypes.util's search only where it is not found under that name (ctypes.util
    imports shutil, tempfile, bz2 and lzma: ~0.5 MB of the agent's RSS, docs/benchmarks.md lean4)."""
    try:
        return ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError:
        from ctypes.util import find_library  # only on this unusual path (see above)

        found = find_library("bpf")
        if found is None:
            raise
        return ctypes.CDLL(found, use_errno=True)


@cache
def lib() -> ctypes.CDLL:
    handle = _open()
    c_int, c_uint, vp = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p
    u32p = ctypes.POINTER(ctypes.c_uint32)
    signatures = {
        "bpf_link_create": [c_int, c_int, c_uint, vp],
        "bpf_prog_query": [c_int, c_uint, ctypes.c_uint32, u32p, u32p, u32p],
        "bpf_map_lookup_elem": [c_int, vp, vp],
        "bpf_map_lookup_and_delete_elem": [c_int, vp, vp],
        "bpf_obj_get_info_by_fd": [c_int, vp, u32p],
        "bpf_map_update_elem": [c_int, vp, vp, ctypes.c_uint64],
        "bpf_map_delete_elem": [c_int, vp],
        "bpf_map_get_next_key": [c_int, vp, vp],
        "bpf_obj_get": [ctypes.c_char_p],
        "bpf_obj_pin": [c_int, ctypes.c_char_p],
        "libbpf_num_possible_cpus": [],
    }
    for name, argtypes in signatures.items():
        fn = getattr(handle, name)
        fn.argtypes, fn.restype = argtypes, c_int
    return handle


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno() or -rc
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach a program to a cgroup (target_fd: its directory) as a BPF link; returns the link fd.
    The attachment lives exactly as long as the link fd: closing it -- or the process dying -- detaches."""
    return _check(lib().bpf_link_create(prog_fd, target_fd, attach_type, None), "BPF_LINK_CREATE")


def prog_query(target_fd: int, attach_type: int, capacity: int = 64) -> list[int]:
    """Ids of the programs attached directly to a cgroup at this hook (inherited ones not included)."""
    ids = (ctypes.c_uint32 * capacity)()
    count = ctypes.c_uint32(capacity)
    flags = ctypes.c_uint32(0)
    _check(lib().bpf_prog_query(target_fd, attach_type, 0, flags, ids, count), "BPF_PROG_QUERY")
    return list(ids[: count.value])


def prog_id(prog_fd: int) -> int:
    """A loaded program's id (struct bpf_prog_info: __u32 type, __u32 id, ...)."""
    return int.from_bytes(_info(prog_fd)[4:8], "little")


def _info(fd: int, size: int = 256) -> bytes:
    info = ctypes.create_string_buffer(size)  # the kernel fills at most what we offer
    length = ctypes.c_uint32(len(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, info, length), "BPF_OBJ_GET_INFO_BY_FD")
    return info.raw


def map_info(map_fd: int) -> tuple[int, int, int, int, int]:
    """(type, id, key_size, value_size, max_entries) of a map (struct bpf_map_info's first fields)."""
    raw = _info(map_fd)
    return tuple(int.from_bytes(raw[i : i + 4], "little") for i in range(0, 20, 4))  # type: ignore[return-value]


def prog_map_ids(prog_fd: int, capacity: int = 64) -> list[int]:
    """Ids of the maps a loaded program uses (struct bpf_prog_info: nr_map_ids at 52, map_ids at 56)."""
    ids = (ctypes.c_uint32 * capacity)()
    info = ctypes.create_string_buffer(256)
    info.raw = (
        info.raw[:52] + capacity.to_bytes(4, "little") + ctypes.addressof(ids).to_bytes(8, "little") + bytes(256 - 64)
    )
    length = ctypes.c_uint32(len(info))
    _check(lib().bpf_obj_get_info_by_fd(prog_fd, info, length), "BPF_OBJ_GET_INFO_BY_FD")
    count = int.from_bytes(info.raw[52:56], "little")
    return list(ids[: min(count, capacity)])


def obj_get(path: str) -> int:
    """An fd for a pinned map or program (BPF_OBJ_GET); FileNotFoundError if nothing is pinned there."""
    return _check(lib().bpf_obj_get(path.encode()), f"BPF_OBJ_GET {path}")


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, path.encode()), f"BPF_OBJ_PIN {path}")


@cache
def possible_cpus() -> int:
    """How many per-CPU slots a per-CPU map value has."""
    return _check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    _check(lib().bpf_map_update_elem(map_fd, key, value, 0), "map update")  # 0: BPF_ANY


def map_delete(map_fd: int, key: bytes) -> bool:
    """Remove `key`; False if it was not there."""
    rc = lib().bpf_map_delete_elem(map_fd, key)
    if rc < 0:
        err = ctypes.get_errno() or -rc
        if err == 2:  # ENOENT
            return False
        raise OSError(err, f"map delete: {os.strerror(err)}")
    return True


def map_keys(map_fd: int, key_size: int) -> list[bytes]:
    """Every key of a map (BPF_MAP_GET_NEXT_KEY from NULL). A walk concurrent with deletes may skip or
    restart; callers take a snapshot and then modify."""
    keys: list[bytes] = []
    prev: ctypes.Array | None = None
    while True:
        nxt = ctypes.create_string_buffer(key_size)
        rc = lib().bpf_map_get_next_key(map_fd, prev, nxt)
        if rc < 0:
            err = ctypes.get_errno() or -rc
            if err == 2:  # ENOENT: the end
                return keys
            raise OSError(err, f"map get_next_key: {os.strerror(err)}")
        keys.append(nxt.raw)
        prev = nxt
        if len(keys) > 1 << 22:  # a defensive bound: no map of ours holds 4M keys
            raise OSError(0, "map walk does not end")


def map_lookup(map_fd: int, key: bytes, value_size: int, *, delete: bool = False) -> bytes | None:
    """The value stored under `key`, or None if there is none; with delete=True the entry is removed in
    the same call (BPF_MAP_LOOKUP_AND_DELETE_ELEM: two readers can never both get it)."""
    value = ctypes.create_string_buffer(value_size)
    fn = lib().bpf_map_lookup_and_delete_elem if delete else lib().bpf_map_lookup_elem
    rc = fn(map_fd, key, value)
    if rc < 0:
        err = ctypes.get_errno() or -rc
        if err == 2:  # ENOENT
            return None
        raise OSError(err, f"map lookup: {os.strerror(err)}")
    return value.raw


__all__ = [
    "BPF_CGROUP_INET4_CONNECT",
    "BPF_CGROUP_INET6_CONNECT",
    "BPF_CGROUP_SOCK_OPS",
    "link_create",
    "map_delete",
    "map_info",
    "map_keys",
    "map_lookup",
    "map_update",
    "obj_get",
    "obj_pin",
    "possible_cpus",
    "prog_id",
    "prog_map_ids",
    "prog_query",
]
