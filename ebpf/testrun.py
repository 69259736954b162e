"""Run the loaded classifier on given bytes with the kernel's BPF_PROG_TEST_RUN (libbpf's
bpf_prog_test_run_opts through ctypes): the program sees a real skb built from the packet, in the
network namespace of the calling thread (socket lookups happen there), on its loopback device.

Used by the fixture-table tests and handy for diagnosing a verdict on a captured packet.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from functools import cache


class SkbCtx(ctypes.Structure):
    """The leading part of struct __sk_buff that BPF_PROG_TEST_RUN lets us set and read back.
    Fields before `mark` and between `mark` and `priority` must be zero (the kernel checks)."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
    ]


class TestRunOpts(ctypes.Structure):
    """libbpf's struct bpf_test_run_opts (libbpf 1.x)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


_CTX_OUT_SIZE = 1024  # >= sizeof(struct __sk_buff) on any kernel we know


@dataclass(frozen=True, slots=True)
class RunResult:
    retval: int  # TC_ACT_*
    mark: int  # skb->mark after the program
    data: bytes  # the packet after the program
    duration_ns: int  # average per repetition


@cache
def _libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(TestRunOpts)]
    lib.bpf_prog_test_run_opts.restype = ctypes.c_int
    return lib


def run_skb(prog_fd: int, packet: bytes, *, mark: int = 0, repeat: int = 1) -> RunResult:
    """Run a sched_cls program once (or `repeat` times) on `packet` (from the Ethernet header)."""
    if len(packet) < 14:
        raise ValueError("BPF_PROG_TEST_RUN needs at least an Ethernet header (14 bytes)")
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    ctx_in = SkbCtx(mark=mark)
    # The kernel copies back its whole struct __sk_buff (ENOSPC if we offer less); we read the prefix.
    ctx_out = ctypes.create_string_buffer(_CTX_OUT_SIZE)
    opts = TestRunOpts(
        sz=ctypes.sizeof(TestRunOpts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p),
        data_out=ctypes.cast(data_out, ctypes.c_void_p),
        data_size_in=len(packet),
        data_size_out=len(data_out),
        ctx_in=ctypes.cast(ctypes.pointer(ctx_in), ctypes.c_void_p),
        ctx_out=ctypes.cast(ctx_out, ctypes.c_void_p),
        ctx_size_in=ctypes.sizeof(SkbCtx),
        ctx_size_out=_CTX_OUT_SIZE,
        repeat=repeat,
    )
    rc = _libbpf().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc != 0:
        err = ctypes.get_errno() or -rc
        raise OSError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
    out = SkbCtx.from_buffer_copy(ctx_out.raw[: ctypes.sizeof(SkbCtx)])
    return RunResult(int(opts.retval), int(out.mark), data_out.raw[: opts.data_size_out], int(opts.duration))
