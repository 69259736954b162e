"""What the egress classifier is (pm_egress.c, its program and filter slot) and the error shaping raises: shared by
ebpf/egress_shaper.py (the program's holder, no pyroute2) and ebpf/egress_netlink.py (the tc side)."""

from __future__ import annotations

from pathlib import Path

from planemesh.ebpf import build

EBPF_DIR = Path(__file__).resolve().parent
SOURCE = EBPF_DIR / "pm_egress.c"
PROGRAM = "pm_tc_egress"
TC_H_ROOT = 0xFFFFFFFF
FILTER_PRIO = 0x504D
FILTER_HANDLE = 0x1
ETH_P_ALL = 0x0003
SPEC = build.ProgramSpec(SOURCE, (f"-I{EBPF_DIR}",), ((PROGRAM, "SCHED_CLS", None),))


class ShapingError(RuntimeError):
    """The egress classifier cannot be loaded or the HTB tree cannot be applied."""
