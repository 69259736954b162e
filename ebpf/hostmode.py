"""Host mode: redirect connects of processes running directly on the node (a cgroup v2 of theirs) to the
plane proxy, and tell the proxy where each connection was going.

    host = HostMode("/sys/fs/cgroup/unified/system.slice/app.service")
    host.apply_snapshot(snapshot)          # planes' CIDRs, listener ports, proxy/sniff ports
    host.attach()                          # connect4 + connect6 + sock_ops on that cgroup
    proxy = PlaneProxy(snapshot, "oam", original_destination=host.proxy_original_destination)
    ...
    host.close()                           # detach; the maps go with the program

pm_host.c rewrites a TCP connect whose (plane of destination, port) is PROXY (or SNIFF) to the plane's
listener on loopback and records the original destination; `original_destination(peer_ip, peer_port)`
pops it after accept(). The proxy's own process must stay outside the cgroup (else its upstream
connects would loop back to itself; sockets carrying the own mark are skipped as a second guard).
All calls belong on the agent's control thread, except `original_destination`, which is a single map
lookup-and-delete and safe from the proxy's event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
from collections.abc import Iterable
from pathlib import Path

from planemesh.agent.config import Snapshot
from planemesh.ebpf import abi
from planemesh.ebpf.abi import Action
from planemesh.ebpf.policy import DatapathPolicy, PolicyRule, policy_from_snapshot
from planemesh.netplanes.model import Plane

EBPF_DIR = Path(__file__).resolve().parent
SOURCE = EBPF_DIR / "pm_host.c"
CGROUP2_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
BPF_F_ALLOW_MULTI = 0x2  # coexist with other programs on the cgroup (systemd's, for instance)


class HostModeError(RuntimeError):
    """The host-mode programs cannot be loaded or attached as asked."""


def _validated_cgroup(path: str) -> str:
    real = os.path.realpath(path)
    if not any(real == root or real.startswith(root + "/") for root in CGROUP2_ROOTS):
        raise HostModeError(f"{path!r} is not below a cgroup v2 mount ({', '.join(CGROUP2_ROOTS)})")
    # cgroup.controllers exists only in cgroup v2 directories (v1 hierarchies have none).
    if not os.path.isfile(os.path.join(real, "cgroup.controllers")):
        raise HostModeError(f"{path!r} is not a cgroup v2 directory")
    return real


def _peer_key(peer_ip: str, peer_port: int) -> bytes:
    ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    key = abi.PmHostPeer()
    key.family = abi.PM_FAMILY_V4 if ip.version == 4 else abi.PM_FAMILY_V6
    key.port = peer_port
    ctypes.memmove(key.addr, ip.packed, len(ip.packed))
    return bytes(key)


def decode_orig(raw: bytes) -> tuple[str, int, int]:
    """pm_host_orig bytes -> (address, port, plane_id)."""
    orig = abi.PmHostOrig.from_buffer_copy(raw)
    size = 4 if orig.family == abi.PM_FAMILY_V4 else 16
    return str(ipaddress.ip_address(bytes(orig.addr[:size]))), socket.ntohs(orig.port), int(orig.plane_id)


class HostMode:
    def __init__(self, cgroup_path: str, *, own_mark: int = abi.PM_MARK_OWN) -> None:
        from bcc import BPF, BPFAttachType  # imported here: the pure parts need no bcc

        self.cgroup_path = _validated_cgroup(cgroup_path)
        if not own_mark:
            raise HostModeError("the own mark must be non-zero")
        try:
            self.bpf = BPF(
                src_file=str(SOURCE).encode(), cflags=[f"-I{EBPF_DIR}", f"-DPM_HOST_OWN_MARK={own_mark:#x}u"]
            )
            self._progs = []  # (program, attach type): connects first, sock_ops last
            for name, attach_type in (
                (b"pm_connect4", BPFAttachType.CGROUP_INET4_CONNECT),
                (b"pm_connect6", BPFAttachType.CGROUP_INET6_CONNECT),
            ):
                # cgroup sock_addr programs name their hook at load time (expected_attach_type).
                fn = self.bpf.load_func(name, BPF.CGROUP_SOCK_ADDR, attach_type=attach_type)
                self._progs.append((fn, attach_type))
            self._progs.append((self.bpf.load_func(b"pm_sockops", BPF.SOCK_OPS), BPFAttachType.CGROUP_SOCK_OPS))
        except Exception as exc:
            raise HostModeError(f"cannot load {SOURCE.name}: {exc}") from exc
        self._cgroup_fd: int | None = None
        self._tables = {
            name: self.bpf[name.encode()]
            for name in ("pm_host_dest", "pm_host_policy", "pm_host_planes", "pm_host_by_cookie", "pm_host_by_peer")
        }

    # ---- attachment -----------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._cgroup_fd is not None

    def attach(self) -> None:
        """Attach connect4, connect6 and sock_ops to the cgroup (sock_ops first, so no redirected
        connect misses its re-keying). Idempotent."""
        from bcc import BPF

        if self._cgroup_fd is not None:
            return
        fd = os.open(self.cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        done = []
        try:
            for fn, attach_type in reversed(self._progs):
                BPF.attach_func(fn, fd, attach_type, BPF_F_ALLOW_MULTI)
                done.append((fn, attach_type))
        except Exception as exc:
            for fn, attach_type in done:
                with contextlib.suppress(Exception):
                    BPF.detach_func(fn, fd, attach_type)
            os.close(fd)
            raise HostModeError(f"cannot attach to {self.cgroup_path}: {exc}") from exc
        self._cgroup_fd = fd

    def detach(self) -> None:
        """Detach our programs (connects first); other programs on the cgroup stay. Idempotent."""
        from bcc import BPF

        if self._cgroup_fd is None:
            return
        fd, self._cgroup_fd = self._cgroup_fd, None
        try:
            for fn, attach_type in self._progs:
                with contextlib.suppress(Exception):  # the cgroup may be gone with its programs
                    BPF.detach_func(fn, fd, attach_type)
        finally:
            os.close(fd)

    # ---- configuration ----------------------------------------------------------------------------
    def apply_snapshot(self, snap: Snapshot) -> None:
        """Planes, their CIDRs and the listener policy of a snapshot (ConfigError if it has none valid)."""
        self.apply(policy_from_snapshot(snap), snap.planes)

    def apply(self, policy: DatapathPolicy, planes: Iterable[Plane]) -> None:
        """Make the maps hold exactly this policy and these plane CIDRs: adds and updates first, then
        deletes, so an entry present before and after never disappears in between."""
        dest = self._tables["pm_host_dest"]
        wanted_dest: dict[bytes, int] = {}
        for plane in planes:
            for net in plane.cidrs:
                wanted_dest[abi.dest_key_bytes(str(net.cidr))] = plane.plane_id
        self._sync(dest, {k: dest.Leaf(v, 0) for k, v in wanted_dest.items()})

        table = self._tables["pm_host_planes"]
        wanted_planes = {p.plane_id for p in policy.planes}
        for p in policy.planes:
            leaf = table.Leaf()
            leaf.proxy_port, leaf.sniff_port, leaf.undeclared_action = p.proxy_port, p.sniff_port, int(p.undeclared)
            leaf.flags = abi.PM_PLANE_F_ACTIVE
            table[table.Key(p.plane_id)] = leaf
        for plane_id in range(1, abi.PM_MAX_PLANES):
            if plane_id not in wanted_planes and table[table.Key(plane_id)].flags:
                table[table.Key(plane_id)] = table.Leaf()

        pol = self._tables["pm_host_policy"]
        self._sync(
            pol,
            {abi.policy_key_bytes(r.plane_id, r.port, r.prefix): pol.Leaf(int(a), 0) for r, a in policy.rules.items()},
        )

    @staticmethod
    def _sync(table, wanted: dict[bytes, object]) -> None:  # type: ignore[no-untyped-def]
        current = {bytes(k): bytes(v) for k, v in table.items()}
        for raw, leaf in wanted.items():
            if current.get(raw) != bytes(leaf):  # type: ignore[call-overload]
                table[table.Key.from_buffer_copy(raw)] = leaf
        for raw in set(current) - set(wanted):
            with contextlib.suppress(KeyError):
                del table[table.Key.from_buffer_copy(raw)]

    def rules(self) -> dict[PolicyRule, Action]:
        found = {}
        for key, leaf in self._tables["pm_host_policy"].items():
            plane_id, port, prefix = abi.decode_policy_key(bytes(key))
            found[PolicyRule(plane_id, port, prefix)] = Action(leaf.action)
        return found

    # ---- lookups (the proxy) ------------------------------------------------------------------------
    def original_destination(self, peer_ip: str, peer_port: int) -> tuple[str, int] | None:
        """Where the redirected connection from (peer_ip, peer_port) was going, or None if it was not
        redirected by us. The entry is consumed: each connection asks once, after accept()."""
        found = self.lookup(peer_ip, peer_port, consume=True)
        return (found[0], found[1]) if found else None

    def lookup(self, peer_ip: str, peer_port: int, *, consume: bool = False) -> tuple[str, int, int] | None:
        """(address, port, plane_id) recorded for this peer, or None. Malformed input gives None."""
        try:
            raw = _peer_key(peer_ip, int(peer_port))
        except (ValueError, TypeError, OverflowError):
            return None
        if not 0 < int(peer_port) < 65536:
            return None
        table = self._tables["pm_host_by_peer"]
        key = table.Key.from_buffer_copy(raw)
        try:
            leaf = table[key]
        except KeyError:
            return None
        found = decode_orig(bytes(leaf))
        if consume:
            with contextlib.suppress(KeyError):
                del table[key]
        return found

    def proxy_original_destination(self, sockname: tuple, peername: tuple) -> tuple[str, int]:
        """PlaneProxy's `original_destination` callable: host-mode connections by their peer, anything
        else (TC-intercepted, transparent) by the accepted socket's own address."""
        found = self.original_destination(peername[0], peername[1])
        return found if found else (sockname[0], sockname[1])

    def pending(self) -> int:
        """Redirected connections not yet looked up (both stages)."""
        return len(self._tables["pm_host_by_peer"]) + len(self._tables["pm_host_by_cookie"])

    # ---- lifecycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        self.detach()
        self.bpf.cleanup()

    def __enter__(self) -> HostMode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["HostMode", "HostModeError", "decode_orig"]
