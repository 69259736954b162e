"""Load the TC classifier, attach it to interfaces, and keep its maps in step with policy.

One `Datapath` = one loaded program and one set of maps, shared by every interface it is attached
to. bcc compiles it in a short-lived helper process (ebpf/build.py): this process holds only the
program and map fds and talks to the maps with the bpf() syscall, never importing bcc. With `pin_dir`
the maps are pinned there (a restarted agent re-adopts interface/plane/policy state, and the TC filters
a previous agent left attached keep working until `attach` swaps in the new program), and so is the
program, under its content hash: a restart or hot upgrade with the same source, flags and kernel
re-uses it and compiles nothing. Without `pin_dir` nothing is pinned.

Interface indexes are those of the network namespace the calling thread is in when it calls
`attach`/`detach`; keep one Datapath per namespace. The tc calls go through a TcHooks (ebpf/tc_hooks.py): pyroute2
in this process by default, the agent's short-lived netlink helper in the agent (no pyroute2 imported here).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from planemesh.ebpf import abi, build
from planemesh.ebpf.abi import Action
from planemesh.ebpf.maps import open_maps, u32_key
from planemesh.ebpf.policy import DatapathPolicy, PlaneSettings, PolicyRule, SourceRule

if TYPE_CHECKING:
    from pyroute2 import IPRoute

    from planemesh.ebpf.tc_hooks import TcHooks

EBPF_DIR = Path(__file__).resolve().parent
SOURCE = EBPF_DIR / "pm_tc.c"
PROGRAM = "pm_tc_ingress"
# map -> (key size, value type): the ABI mirror's layouts, checked against every map we open (pinned
# maps of another layout are refused before anything is written to them).
MAP_LAYOUTS: dict[str, tuple[int, type[ctypes.Structure]]] = {
    "pm_ifaces": (4, abi.PmIface),
    "pm_planes": (4, abi.PmPlane),
    "pm_policy": (ctypes.sizeof(abi.PmPolicyKey), abi.PmPolicyVal),
    "pm_counters": (4, abi.PmCounter),
    "pm_config": (4, abi.PmConfig),
    "pm_dests": (ctypes.sizeof(abi.PmDestKey), abi.PmDestVal),
    "pm_forward": (4, abi.PmForward),
    "pm_src_policy": (ctypes.sizeof(abi.PmSrcPolicyKey), abi.PmPolicyVal),
}
MAP_NAMES = tuple(MAP_LAYOUTS)
BPFFS = "/sys/fs/bpf"
_SAFE_PIN_DIR = re.compile(r"^/[A-Za-z0-9_./-]+$")


class DatapathError(RuntimeError):
    """The data path cannot be loaded or configured as asked."""


@dataclass(frozen=True, slots=True)
class SyncResult:
    added: int = 0
    updated: int = 0
    deleted: int = 0


def program_spec(pin_dir: str | None) -> build.ProgramSpec:
    cflags = [f"-I{EBPF_DIR}"]
    if pin_dir:
        cflags.append(f'-DPM_PIN_DIR="{pin_dir}"')
    return build.ProgramSpec(SOURCE, tuple(cflags), ((PROGRAM, "SCHED_CLS", None),), MAP_NAMES)


def _validated_pin_dir(pin_dir: str) -> str:
    path = os.path.normpath(pin_dir)
    if not _SAFE_PIN_DIR.match(path) or not (path == BPFFS or path.startswith(BPFFS + "/")):
        raise DatapathError(f"pin directory {pin_dir!r} must be a plain path below {BPFFS}")
    return path


class Datapath:
    def __init__(
        self,
        pin_dir: str | None = None,
        *,
        local_mark: int = abi.PM_MARK_LOCAL,
        own_mark: int = abi.PM_MARK_OWN,
        mark_planes: bool = False,
        tc: TcHooks | None = None,
    ) -> None:
        self.tc = tc  # where attach/detach run (None: here, through pyroute2)
        self.pin_dir = _validated_pin_dir(pin_dir) if pin_dir else None
        if self.pin_dir:
            os.makedirs(self.pin_dir, exist_ok=True)
        try:
            self._loaded = build.load(program_spec(self.pin_dir), self.pin_dir)
        except (build.BuildError, OSError) as exc:
            raise DatapathError(f"cannot load {SOURCE.name}: {exc}") from exc
        try:
            self._tables = open_maps(self._loaded.maps, MAP_LAYOUTS)
        except (OSError, ValueError) as exc:
            self._loaded.close()
            raise DatapathError(f"cannot load {SOURCE.name}: {exc}") from exc
        self.compiled = self._loaded.compiled  # False: a pinned program of the same content hash was re-used
        try:
            self.set_marks(local_mark, own_mark, mark_planes)
        except Exception:
            self._loaded.close()
            raise

    # ---- configuration ----------------------------------------------------------------------
    def set_marks(self, local_mark: int, own_mark: int, mark_planes: bool = False) -> None:
        """Write the global config: ABI version, the mark layout (see pm_abi.h)."""
        table = self._tables["pm_config"]
        current = abi.PmConfig.from_buffer_copy(table.get(u32_key(0)) or bytes(ctypes.sizeof(abi.PmConfig)))
        if current.abi_version not in (0, abi.PM_ABI_VERSION):
            raise DatapathError(
                f"pinned maps in {self.pin_dir} speak ABI v{current.abi_version}, this agent v{abi.PM_ABI_VERSION}:"
                " remove that pin directory (and the filters using it) first"
            )
        if local_mark & own_mark or not local_mark or not own_mark:
            raise DatapathError(f"local mark {local_mark:#x} and own mark {own_mark:#x} must be disjoint and non-zero")
        if (local_mark | own_mark) & abi.PM_MARK_PLANE_MASK:
            raise DatapathError(f"marks must leave the plane bits {abi.PM_MARK_PLANE_MASK:#x} free")
        cfg = abi.PmConfig()
        cfg.abi_version = abi.PM_ABI_VERSION
        cfg.local_mark = cfg.local_mask = local_mark
        cfg.own_mark = cfg.own_mask = own_mark
        cfg.plane_mask = abi.PM_MARK_PLANE_MASK if mark_planes else 0
        cfg.flags = current.flags & abi.PM_CFG_F_SRC_POLICY if current.abi_version else 0  # the rules' state stays
        table.put(u32_key(0), bytes(cfg))
        self.local_mark, self.own_mark = local_mark, own_mark

    @property
    def prog_fd(self) -> int:
        return self._loaded.programs[PROGRAM]

    # ---- interfaces -------------------------------------------------------------------------
    def _iface(self, ifindex: int) -> abi.PmIface | None:
        raw = self._tables["pm_ifaces"].get(u32_key(ifindex))
        return abi.PmIface.from_buffer_copy(raw) if raw is not None else None

    def _put_iface(self, ifindex: int, plane_id: int, flags: int) -> None:
        table = self._tables["pm_ifaces"]
        if plane_id == 0 and flags == 0:
            table.delete(u32_key(ifindex))
            return
        table.put(u32_key(ifindex), bytes(abi.PmIface(plane_id, flags)))

    def set_interface(self, ifindex: int, plane_id: int) -> None:
        """Packets entering `ifindex` belong to `plane_id` (1..63)."""
        if not 1 <= plane_id < abi.PM_MAX_PLANES:
            raise ValueError(f"plane id {plane_id} is outside 1..{abi.PM_MAX_PLANES - 1}")
        current = self._iface(ifindex)
        self._put_iface(ifindex, plane_id, current.flags if current else 0)

    def clear_interface(self, ifindex: int) -> None:
        """`ifindex` is no plane any more: its packets pass untouched (it stays attached if it was)."""
        current = self._iface(ifindex)
        if current:
            self._put_iface(ifindex, 0, current.flags)

    def interfaces(self) -> dict[int, tuple[int, int]]:
        """ifindex -> (plane_id, PM_IF_F_* flags) as the map holds them."""
        found = {}
        for key, raw in self._tables["pm_ifaces"].items():
            iface = abi.PmIface.from_buffer_copy(raw)
            found[int.from_bytes(key, "little")] = (int(iface.plane_id), int(iface.flags))
        return found

    def _hooks(self, ipr: IPRoute | None) -> TcHooks:
        if ipr is None and self.tc is not None:
            return self.tc
        from planemesh.ebpf.tc_attach import LocalTc  # pyroute2: only where no other TcHooks was given

        return LocalTc(ipr)

    def attach(self, ifindex: int, ipr: IPRoute | None = None) -> None:
        """Attach to `ifindex` of the current netns (clsact ingress, direct action). Idempotent."""
        created = self._hooks(ipr).attach(ifindex, self.prog_fd, PROGRAM)
        current = self._iface(ifindex)
        flags = (current.flags if current else 0) | abi.PM_IF_F_ATTACHED
        if created:
            flags |= abi.PM_IF_F_CLSACT_OURS
        self._put_iface(ifindex, current.plane_id if current else 0, flags)

    def detach(self, ifindex: int, ipr: IPRoute | None = None) -> None:
        """Remove our filter (and the clsact qdisc if we created it and it is unused) and forget ifindex."""
        current = self._iface(ifindex)
        self._hooks(ipr).detach(ifindex, bool(current and current.flags & abi.PM_IF_F_CLSACT_OURS))
        self._put_iface(ifindex, 0, 0)

    # ---- planes and policy ------------------------------------------------------------------
    def set_plane(
        self,
        plane_id: int,
        proxy_port: int,
        sniff_port: int,
        undeclared: Action,
        fail_closed: bool = False,
        forward_to: frozenset[int] = frozenset(),
        drop_orphans: bool = False,
    ) -> None:
        """A plane's settings; `forward_to`: the planes whose addresses its traffic may reach; `drop_orphans`:
        a non-SYN of an intercepted flow whose socket is gone is dropped instead of routed (HBONE)."""
        if not 1 <= plane_id < abi.PM_MAX_PLANES:
            raise ValueError(f"plane id {plane_id} is outside 1..{abi.PM_MAX_PLANES - 1}")
        for port in (proxy_port, sniff_port):
            if not 0 <= port <= 65535:
                raise ValueError(f"{port} is not a TCP port")
        if Action(undeclared) not in (Action.BYPASS, Action.SNIFF, Action.PROXY, Action.DROP):
            raise ValueError(f"undeclared action {undeclared!r} is not a verdict")
        leaf = abi.PmPlane()
        leaf.proxy_port, leaf.sniff_port, leaf.undeclared_action = proxy_port, sniff_port, int(undeclared)
        leaf.flags = abi.PM_PLANE_F_ACTIVE | (abi.PM_PLANE_F_FAIL_CLOSED if fail_closed else 0)
        leaf.flags |= abi.PM_PLANE_F_NO_ORPHANS if drop_orphans else 0
        self._tables["pm_forward"].put(u32_key(plane_id), bytes(abi.PmForward(abi.forward_mask(forward_to))))
        self._tables["pm_planes"].put(u32_key(plane_id), bytes(leaf))

    def clear_plane(self, plane_id: int) -> None:
        self._tables["pm_planes"].put(u32_key(plane_id), bytes(abi.PmPlane()))
        self._tables["pm_forward"].put(u32_key(plane_id), bytes(abi.PmForward()))

    def planes(self) -> dict[int, PlaneSettings]:
        found = {}
        forward = self._tables["pm_forward"]
        for key, raw in self._tables["pm_planes"].items():
            leaf = abi.PmPlane.from_buffer_copy(raw)
            if leaf.flags & abi.PM_PLANE_F_ACTIVE:
                fwd = forward.get(key)
                mask = int(abi.PmForward.from_buffer_copy(fwd).planes) if fwd else 0
                plane_id = int.from_bytes(key, "little")
                found[plane_id] = PlaneSettings(
                    plane_id,
                    int(leaf.proxy_port),
                    int(leaf.sniff_port),
                    Action(leaf.undeclared_action),
                    bool(leaf.flags & abi.PM_PLANE_F_FAIL_CLOSED),
                    frozenset(p for p in range(1, abi.PM_MAX_PLANES) if mask >> p & 1),
                )
        return found

    def destinations(self) -> dict[str, int]:
        """The destination trie's content: plane CIDR -> plane id."""
        return {
            abi.decode_dest_key(k): int(abi.PmDestVal.from_buffer_copy(v).plane_id)
            for k, v in self._tables["pm_dests"].items()
        }

    def sync_destinations(self, wanted: Mapping[str, int]) -> SyncResult:
        """Make the destination trie hold exactly `wanted` (CIDR -> plane id); add and update before deleting."""
        table = self._tables["pm_dests"]
        current = self.destinations()
        canonical = {abi.decode_dest_key(abi.dest_key_bytes(net)): plane_id for net, plane_id in wanted.items()}
        added = updated = 0
        for net, plane_id in sorted(canonical.items()):
            if current.get(net) == plane_id:
                continue
            table.put(abi.dest_key_bytes(net), bytes(abi.PmDestVal(plane_id, 0)))
            if net in current:
                updated += 1
            else:
                added += 1
        deleted = 0
        for net in sorted(set(current) - set(canonical)):
            deleted += table.delete(abi.dest_key_bytes(net))
        return SyncResult(added, updated, deleted)

    def policy(self) -> dict[PolicyRule, Action]:
        """The policy trie's content, decoded."""
        found = {}
        for key, raw in self._tables["pm_policy"].items():
            plane_id, port, prefix = abi.decode_policy_key(key)
            found[PolicyRule(plane_id, port, prefix)] = Action(abi.PmPolicyVal.from_buffer_copy(raw).action)
        return found

    def sync_policy(self, rules: Mapping[PolicyRule, Action]) -> SyncResult:
        """Make the trie hold exactly `rules`: add and update first, then delete (no flush-and-refill,
        so a rule present before and after is never missing in between)."""
        table = self._tables["pm_policy"]
        current = self.policy()
        added = updated = 0
        for rule, action in sorted(rules.items(), key=lambda item: item[0].sort_key()):
            if current.get(rule) == action:
                continue
            key = abi.policy_key_bytes(rule.plane_id, rule.port, rule.prefix)
            table.put(key, bytes(abi.PmPolicyVal(int(action), 0)))
            if rule in current:
                updated += 1
            else:
                added += 1
        deleted = 0
        for rule in sorted(set(current) - set(rules), key=PolicyRule.sort_key):
            deleted += table.delete(abi.policy_key_bytes(rule.plane_id, rule.port, rule.prefix))
        return SyncResult(added, updated, deleted)

    def source_policy(self) -> dict[SourceRule, Action]:
        """The per-source trie's content, decoded."""
        found = {}
        for key, raw in self._tables["pm_src_policy"].items():
            plane_id, port, source, prefix = abi.decode_src_policy_key(key)
            rule = SourceRule(source, PolicyRule(plane_id, port, prefix))
            found[rule] = Action(abi.PmPolicyVal.from_buffer_copy(raw).action)
        return found

    def _set_config_flag(self, flag: int, on: bool) -> None:
        table = self._tables["pm_config"]
        cfg = abi.PmConfig.from_buffer_copy(table.get(u32_key(0)) or bytes(ctypes.sizeof(abi.PmConfig)))
        flags = cfg.flags | flag if on else cfg.flags & ~flag
        if flags != cfg.flags:
            cfg.flags = flags
            table.put(u32_key(0), bytes(cfg))

    def sync_source_policy(self, rules: Mapping[SourceRule, Action]) -> SyncResult:
        """Make the per-source trie hold exactly `rules`, adds and updates before deletes; the program looks it
        up only while it holds rules (PM_CFG_F_SRC_POLICY: set after the first rule, cleared before the last
        goes)."""
        table = self._tables["pm_src_policy"]
        current = self.source_policy()
        if len(rules) > abi.PM_MAX_SRC_POLICY:
            raise DatapathError(f"{len(rules)} per-source rules, the map holds {abi.PM_MAX_SRC_POLICY}")
        added = updated = 0
        for key, action in sorted(rules.items(), key=lambda item: item[0].sort_key()):
            if current.get(key) == action:
                continue
            r = key.rule
            table.put(abi.src_policy_key_bytes(r.plane_id, r.port, key.source, r.prefix),
                      bytes(abi.PmPolicyVal(int(action), 0)))  # fmt: skip
            if key in current:
                updated += 1
            else:
                added += 1
        self._set_config_flag(abi.PM_CFG_F_SRC_POLICY, bool(rules))
        deleted = 0
        for key in sorted(set(current) - set(rules), key=SourceRule.sort_key):
            r = key.rule
            deleted += table.delete(abi.src_policy_key_bytes(r.plane_id, r.port, key.source, r.prefix))
        return SyncResult(added, updated, deleted)

    def apply(self, policy: DatapathPolicy) -> SyncResult:
        """Planes first (so new rules never point at an unconfigured plane), then the rules and the
        destinations' planes, then deactivate planes that are gone."""
        wanted = {p.plane_id for p in policy.planes}
        for p in policy.planes:
            self.set_plane(p.plane_id, p.proxy_port, p.sniff_port, p.undeclared, p.fail_closed, p.forward_to)
        result = self.sync_policy(policy.rules)
        own = self.sync_source_policy(policy.source_rules)
        result = SyncResult(result.added + own.added, result.updated + own.updated, result.deleted + own.deleted)
        self.sync_destinations(policy.destinations)
        for plane_id in set(self.planes()) - wanted:
            self.clear_plane(plane_id)
        return result

    # ---- counters ---------------------------------------------------------------------------
    def counters(self) -> dict[tuple[int, int], tuple[int, int]]:
        """{(plane_id, slot): (packets, bytes)} summed over CPUs, non-zero slots only. Slots are
        abi.Action and abi.Reason values."""
        table = self._tables["pm_counters"]
        per_cpu_type = abi.PmCounter * (table.read_size // ctypes.sizeof(abi.PmCounter))
        found = {}
        for idx in range(abi.PM_CNT_ENTRIES):
            raw = table.get(u32_key(idx))
            if raw is None:
                continue
            per_cpu = per_cpu_type.from_buffer_copy(raw)
            packets = sum(int(c.packets) for c in per_cpu)
            if packets:
                found[divmod(idx, abi.PM_CNT_SLOTS)] = (packets, sum(int(c.bytes) for c in per_cpu))
        return found

    def map_fd(self, name: str) -> int:
        return self._tables[name].fd

    # ---- lifecycle --------------------------------------------------------------------------
    def close(self, detach: bool = True, ipr: IPRoute | None = None) -> None:
        """Release the program. detach=True also removes our filters from every interface recorded
        as attached (in the current netns) and unpins the maps; detach=False leaves the data path
        running for the next agent to re-adopt."""
        if detach:
            for ifindex, (_plane, flags) in self.interfaces().items():
                if flags & abi.PM_IF_F_ATTACHED:
                    self.detach(ifindex, ipr)
            if self.pin_dir:
                self.unpin()
        for table in self._tables.values():
            table.close()
        self._loaded.close()

    def unpin(self) -> None:
        """Remove the map pins and every program pinned in the directory (ours, the egress classifier's,
        host mode's: ebpf/build.py), so a later start compiles afresh."""
        if not self.pin_dir:
            return
        build.remove_program_pins(self.pin_dir)
        for name in MAP_NAMES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.pin_dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.pin_dir)

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Datapath", "DatapathError", "SyncResult"]
