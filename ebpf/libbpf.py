"""The few libbpf calls bcc's Python API lacks, through ctypes on libbpf.so.1 (libbcc links it, so it is
there wherever bcc is): cgroup attachment as a BPF link, the programs attached to a cgroup, and map
lookups on a bare map fd (a proxy worker holds only the fd, never a bcc object).

Every call raises OSError with the kernel's errno on failure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache

# enum bpf_attach_type (include/uapi/linux/bpf.h): values never change.
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11


@cache
def lib() -> ctypes.CDLL:
    handle = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    c_int, c_uint, vp = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p
    u32p = ctypes.POINTER(ctypes.c_uint32)
    signatures = {
        "bpf_link_create": [c_int, c_int, c_uint, vp],
        "bpf_prog_query": [c_int, c_uint, ctypes.c_uint32, u32p, u32p, u32p],
        "bpf_map_lookup_elem": [c_int, vp, vp],
        "bpf_map_lookup_and_delete_elem": [c_int, vp, vp],
        "bpf_obj_get_info_by_fd": [c_int, vp, u32p],
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
    info = ctypes.create_string_buffer(256)  # the kernel fills at most what we offer
    size = ctypes.c_uint32(len(info))
    _check(lib().bpf_obj_get_info_by_fd(prog_fd, info, size), "BPF_OBJ_GET_INFO_BY_FD")
    return int.from_bytes(info.raw[4:8], "little")


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
    "map_lookup",
    "prog_id",
    "prog_query",
]
