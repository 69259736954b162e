"""pm_abi.h's packet-mark bits, the part of the ABI mirror (ebpf/abi.py re-exports them) that a proxy worker
needs: without abi.py's ctypes structs, so a worker loads no ctypes (~0.35 MB of RSS each, docs/benchmarks.md
"Lean 5"). tests/unit/test_ebpf_abi_header.py checks them against the header through abi.py."""

from __future__ import annotations

PM_MARK_PLANE_MASK = 0x0000003F
PM_MARK_LOCAL = 0x00400000
PM_MARK_OWN = 0x00800000
