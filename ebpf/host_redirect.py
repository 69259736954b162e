"""Host mode: redirect connects of processes running directly on the node (cgroups v2 of theirs) to the
plane proxy, and tell the proxy where each connection was going.

    host = HostMode(own_mark=abi.PM_MARK_OWN)       # load once (a helper compiles, or pins are re-used)
    host.apply_snapshot(snapshot)                    # planes' CIDRs, listener policy, proxy/sniff ports
    host.attach("/sys/fs/cgroup/unified/telecom.slice")   # connect4 + connect6 + sock_ops, as BPF links
    proxy = PlaneProxy(snapshot, "oam", original_destination=host.destinations.proxy_original_destination)
    ...
    host.close()                                     # detach everywhere; the maps go with the programs

pm_host.c rewrites a TCP connect whose (plane of destination, port) is PROXY (or SNIFF) to the plane's
listener on loopback -- only while that listener exists -- and records the original destination, which
`OriginalDestinations` pops after accept(). `OriginalDestinations` needs nothing but the map's fd, so a
proxy worker process (agent/worker_process.py) uses it without bcc. One HostMode serves any number of cgroups.

Fail open: the programs are attached as BPF links owned by this process, so they detach when it closes
them or dies (no orphaned program keeps redirecting to a listener nobody serves), and they redirect only
to a listener that exists. The proxy's own upstream sockets carry the own mark (SO_MARK) and are never
redirected, so the proxy may live inside an intercepted cgroup.
All HostMode calls belong on the agent's control thread; `OriginalDestinations` is a single
lookup-and-delete syscall, safe from any proxy event loop.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

from planemesh.ebpf import abi, build, libbpf
from planemesh.ebpf.abi import Action
from planemesh.ebpf.maps import FdMap, open_maps, u32_key
from planemesh.ebpf.policy import DatapathPolicy, PolicyRule, policy_from_snapshot
from planemesh.model.config import Snapshot
from planemesh.model.planes import Plane

EBPF_DIR = Path(__file__).resolve().parent
SOURCE = EBPF_DIR / "pm_host.c"
# map -> (key size, value type) from the ABI mirror, checked against every map we open.
MAP_LAYOUTS: dict[str, tuple[int, type[ctypes.Structure]]] = {
    "pm_host_dest": (ctypes.sizeof(abi.PmDestKey), abi.PmDestVal),
    "pm_host_policy": (ctypes.sizeof(abi.PmPolicyKey), abi.PmPolicyVal),
    "pm_host_planes": (4, abi.PmPlane),
    "pm_host_by_cookie": (8, abi.PmHostOrig),
    "pm_host_by_peer": (ctypes.sizeof(abi.PmHostPeer), abi.PmHostOrig),
}
MAP_NAMES = tuple(MAP_LAYOUTS)
# (program, hook) in attach order: sock_ops first, so no redirected connect misses its re-keying.
PROGRAMS = (
    ("pm_sockops", libbpf.BPF_CGROUP_SOCK_OPS),
    ("pm_connect4", libbpf.BPF_CGROUP_INET4_CONNECT),
    ("pm_connect6", libbpf.BPF_CGROUP_INET6_CONNECT),
)


def program_spec(own_mark: int, pin_dir: str | None) -> build.ProgramSpec:
    """sock_ops loads as SOCK_OPS; cgroup sock_addr programs name their hook at load time (expected_attach_type)."""
    cflags = [f"-I{EBPF_DIR}", f"-DPM_HOST_OWN_MARK={own_mark:#x}u"]
    if pin_dir:
        cflags.append(f'-DPM_PIN_DIR="{pin_dir}"')
    programs = tuple(
        (name, "SOCK_OPS", None) if hook == libbpf.BPF_CGROUP_SOCK_OPS else (name, "CGROUP_SOCK_ADDR", hook)
        for name, hook in PROGRAMS
    )
    return build.ProgramSpec(SOURCE, tuple(cflags), programs, MAP_NAMES)


HOOK_NAMES = {
    libbpf.BPF_CGROUP_SOCK_OPS: "sock_ops",
    libbpf.BPF_CGROUP_INET4_CONNECT: "connect4",
    libbpf.BPF_CGROUP_INET6_CONNECT: "connect6",
}
# Where pm_host.c sends redirected connects: the accepted socket's own address is one of these.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})


class HostModeError(RuntimeError):
    """The host-mode programs cannot be loaded or attached as asked."""


# ---- cgroup v2 paths -------------------------------------------------------------------------------
def cgroup2_mounts_in(mountinfo: str) -> list[str]:
    """Mount points of type cgroup2 in /proc/<pid>/mountinfo text (`... mountpoint ... - cgroup2 ...`)."""
    found = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if sep and len(fields) >= 5 and tail.split()[:1] == ["cgroup2"]:
            # mountinfo escapes space, tab, newline and backslash as octal (\040 ...).
            found.append(fields[4].encode().decode("unicode_escape"))
    return found


def cgroup2_mounts() -> list[str]:
    """This machine's cgroup v2 mount points (/sys/fs/cgroup/unified on hybrid systems, else /sys/fs/cgroup)."""
    try:
        with open("/proc/self/mountinfo") as f:
            return cgroup2_mounts_in(f.read())
    except OSError:
        return []


def validated_cgroup(path: str, mounts: Iterable[str] | None = None) -> str:
    """The real path of a cgroup v2 directory, or HostModeError saying why `path` is not one."""
    roots = list(cgroup2_mounts() if mounts is None else mounts)
    if not roots:
        raise HostModeError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)")
    real = os.path.realpath(path)
    if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots):
        raise HostModeError(f"{path!r} is not below a cgroup v2 mount ({', '.join(roots)})")
    # cgroup.controllers exists only in cgroup v2 directories (v1 hierarchies have none).
    if not os.path.isfile(os.path.join(real, "cgroup.controllers")):
        raise HostModeError(f"{path!r} is not a cgroup v2 directory (no such cgroup?)")
    return real


def attached_programs(cgroup_path: str) -> dict[str, list[int]]:
    """Ids of the programs attached directly to a cgroup at the host-mode hooks (any owner's)."""
    fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {name: libbpf.prog_query(fd, hook) for hook, name in HOOK_NAMES.items()}
    finally:
        os.close(fd)


# ---- the proxy's side: original destinations by peer ----------------------------------------------
# struct pm_host_peer / pm_host_orig (pm_abi.h) as struct formats: the per-connection path stays cheap.
_PEER = struct.Struct("=BBH16s")  # family, pad, port (host order), addr
_ORIG = struct.Struct("=BB2sI16s")  # family, pad, port (network order), plane_id, addr
_V4_MAPPED = bytes(10) + b"\xff\xff"


def _peer_key(peer_ip: str, peer_port: int) -> bytes:
    """pm_host_peer for an accepted connection's peer (v4-mapped addresses key as IPv4, like sock_ops)."""
    if ":" in peer_ip:
        packed = socket.inet_pton(socket.AF_INET6, peer_ip.split("%", 1)[0])
        if packed[:12] == _V4_MAPPED:
            return _PEER.pack(abi.PM_FAMILY_V4, 0, peer_port, packed[12:])
        return _PEER.pack(abi.PM_FAMILY_V6, 0, peer_port, packed)
    return _PEER.pack(abi.PM_FAMILY_V4, 0, peer_port, socket.inet_pton(socket.AF_INET, peer_ip))


def decode_orig(raw: bytes) -> tuple[str, int, int]:
    """pm_host_orig bytes -> (address, port, plane_id)."""
    family, _, port, plane_id, addr = _ORIG.unpack_from(raw)
    if family == abi.PM_FAMILY_V4:
        return socket.inet_ntop(socket.AF_INET, addr[:4]), int.from_bytes(port, "big"), plane_id
    return socket.inet_ntop(socket.AF_INET6, addr), int.from_bytes(port, "big"), plane_id


class OriginalDestinations:
    """pm_host_by_peer, read through its map fd alone (the fd a worker process inherits)."""

    _ORIG_SIZE = _ORIG.size

    def __init__(self, map_fd: int) -> None:
        self.map_fd = map_fd

    def lookup(self, peer_ip: str, peer_port: int, *, consume: bool = False) -> tuple[str, int, int] | None:
        """(address, port, plane_id) recorded for this peer, or None. Malformed input gives None."""
        try:
            if not 0 < int(peer_port) < 65536:
                return None
            key = _peer_key(peer_ip, int(peer_port))
        except (OSError, ValueError, TypeError, OverflowError):  # inet_pton raises OSError
            return None
        raw = libbpf.map_lookup(self.map_fd, key, self._ORIG_SIZE, delete=consume)
        return decode_orig(raw) if raw is not None else None

    def original_destination(self, peer_ip: str, peer_port: int) -> tuple[str, int] | None:
        """Where the redirected connection from (peer_ip, peer_port) was going, or None if it was not
        redirected by us. The entry is consumed: each connection asks once, after accept()."""
        found = self.lookup(peer_ip, peer_port, consume=True)
        return (found[0], found[1]) if found else None

    def proxy_original_destination(self, sockname: tuple, peername: tuple) -> tuple[str, int]:
        """PlaneProxy's `original_destination` callable. Host-mode connections arrive on a loopback
        address: by their peer. Anything else (TC-intercepted, transparent) costs no syscall: the
        accepted socket's own address is the original destination. A loopback connection we have no
        entry for keeps the listener's address, which the proxy refuses as a loop to itself."""
        if sockname[0] in LOOPBACK_HOSTS:
            found = self.original_destination(peername[0], peername[1])
            if found:
                return found
        return sockname[0], sockname[1]


# ---- the agent's side: programs, attachments and policy maps --------------------------------------
class HostMode:
    def __init__(self, *, own_mark: int = abi.PM_MARK_OWN, pin_dir: str | None = None) -> None:
        if not own_mark:
            raise HostModeError("the own mark must be non-zero (a zero mask would exempt every socket)")
        if pin_dir:
            from planemesh.ebpf.loader import DatapathError, _validated_pin_dir

            try:
                pin_dir = _validated_pin_dir(pin_dir)
            except DatapathError as exc:
                raise HostModeError(str(exc)) from exc
            os.makedirs(pin_dir, exist_ok=True)
        self.pin_dir = pin_dir
        # Compiled by a helper process (ebpf/build.py); pinned programs of the same content hash are re-used.
        try:
            self._loaded = build.load(program_spec(own_mark, pin_dir), pin_dir)
        except (build.BuildError, OSError) as exc:
            raise HostModeError(f"cannot load {SOURCE.name}: {exc}") from exc
        try:
            self._tables: dict[str, FdMap] = open_maps(self._loaded.maps, MAP_LAYOUTS)
        except (OSError, ValueError) as exc:
            self._loaded.close()
            raise HostModeError(f"cannot load {SOURCE.name}: {exc}") from exc
        self.compiled = self._loaded.compiled
        self._progs = [(self._loaded.programs[name], hook) for name, hook in PROGRAMS]
        self._links: dict[str, list[int]] = {}  # cgroup real path -> link fds (attach order)
        self.destinations = OriginalDestinations(self.peer_map_fd)

    @property
    def peer_map_fd(self) -> int:
        """The fd of pm_host_by_peer, for OriginalDestinations in another process (pass_fds)."""
        return self._tables["pm_host_by_peer"].fd

    @property
    def program_ids(self) -> set[int]:
        return {libbpf.prog_id(fd) for fd, _ in self._progs}

    # ---- attachment -----------------------------------------------------------------------------
    @property
    def cgroups(self) -> tuple[str, ...]:
        """The cgroups (real paths) our programs are attached to."""
        return tuple(self._links)

    def attach(self, cgroup_path: str) -> str:
        """Attach sock_ops, connect4 and connect6 to a cgroup v2 directory as BPF links (they coexist
        with anybody else's programs there). Idempotent; returns the cgroup's real path."""
        path = validated_cgroup(cgroup_path)
        if path in self._links:
            return path
        links: list[int] = []
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for prog_fd, hook in self._progs:
                    links.append(libbpf.link_create(prog_fd, fd, hook))
            finally:
                os.close(fd)
        except OSError as exc:
            for link in reversed(links):
                os.close(link)
            raise HostModeError(f"cannot attach to {path}: {exc}") from exc
        self._links[path] = links
        return path

    def detach(self, cgroup_path: str | None = None) -> None:
        """Detach from one cgroup (connects first), or from all of them. Idempotent."""
        if cgroup_path is None:
            for path in list(self._links):
                self.detach(path)
            return
        links = self._links.pop(os.path.realpath(cgroup_path), [])
        for link in reversed(links):  # connect6, connect4, then sock_ops
            os.close(link)

    # ---- configuration ----------------------------------------------------------------------------
    def apply_snapshot(self, snap: Snapshot) -> None:
        """Planes, their CIDRs and the listener policy of a snapshot (ConfigError if it has none valid)."""
        self.apply(policy_from_snapshot(snap), snap.planes)

    def apply(self, policy: DatapathPolicy, planes: Iterable[Plane]) -> None:
        """Make the maps hold exactly this policy and these plane CIDRs: adds and updates first, then
        deletes, so an entry present before and after never disappears in between."""
        wanted_dest: dict[bytes, bytes] = {}
        for plane in planes:
            for net in plane.cidrs:
                wanted_dest[abi.dest_key_bytes(str(net.cidr))] = bytes(abi.PmDestVal(plane.plane_id, 0))
        self._sync(self._tables["pm_host_dest"], wanted_dest)

        table = self._tables["pm_host_planes"]
        wanted_planes = {p.plane_id for p in policy.planes}
        for p in policy.planes:
            leaf = abi.PmPlane()
            leaf.proxy_port, leaf.sniff_port, leaf.undeclared_action = p.proxy_port, p.sniff_port, int(p.undeclared)
            leaf.flags = abi.PM_PLANE_F_ACTIVE
            table.put(u32_key(p.plane_id), bytes(leaf))
        for plane_id in range(1, abi.PM_MAX_PLANES):
            raw = table.get(u32_key(plane_id))
            if plane_id not in wanted_planes and raw is not None and abi.PmPlane.from_buffer_copy(raw).flags:
                table.put(u32_key(plane_id), bytes(abi.PmPlane()))

        self._sync(
            self._tables["pm_host_policy"],
            {
                abi.policy_key_bytes(r.plane_id, r.port, r.prefix): bytes(abi.PmPolicyVal(int(a), 0))
                for r, a in policy.rules.items()
            },
        )

    @staticmethod
    def _sync(table: FdMap, wanted: dict[bytes, bytes]) -> None:
        current = dict(table.items())
        for key, value in wanted.items():
            if current.get(key) != value:
                table.put(key, value)
        for key in set(current) - set(wanted):
            table.delete(key)

    def rules(self) -> dict[PolicyRule, Action]:
        found = {}
        for key, raw in self._tables["pm_host_policy"].items():
            plane_id, port, prefix = abi.decode_policy_key(key)
            found[PolicyRule(plane_id, port, prefix)] = Action(abi.PmPolicyVal.from_buffer_copy(raw).action)
        return found

    # ---- lookups (tests, tools: the proxy uses `destinations`) ----------------------------------------
    def original_destination(self, peer_ip: str, peer_port: int) -> tuple[str, int] | None:
        return self.destinations.original_destination(peer_ip, peer_port)

    def pending(self) -> int:
        """Redirected connections not yet looked up (both stages)."""
        return len(self._tables["pm_host_by_peer"]) + len(self._tables["pm_host_by_cookie"])

    # ---- lifecycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        self.detach()
        for table in self._tables.values():
            table.close()
        self._loaded.close()

    def __enter__(self) -> HostMode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "HostMode",
    "HostModeError",
    "OriginalDestinations",
    "attached_programs",
    "cgroup2_mounts",
    "decode_orig",
    "validated_cgroup",
]
