"""A lab, as declared in YAML: the node, its pods, the planes and who sits on which plane. Pure.

Beyond planes and pods, a lab can make the node look like a VRF-style telecom node:

    node:
      default_via: {pod: router, plane: oam}   # the node's main-table default route (via that pod's address)
      sysctls: {net.ipv4.conf.all.accept_local: 1}   # net.* keys only, written inside the node namespace
    planes:
      - {name: sig, ipv4: 198.18.2.0/24, table: 102}  # the plane's routes in table 102, `iif` rules to it
    pods:
      - {name: router, planes: [oam, sig], forwarding: true}   # forwards between its interfaces
      - {name: client, planes: [sig], gateway: sig}            # default route via the node on plane sig
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from planemesh.model.config import ConfigError
from planemesh.model.ip import IPNetwork
from planemesh.model.planes import MAX_TABLE, RESERVED_TABLES
from planemesh.model.static_config import parse_cidr

_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # short: interface names are <pod>-<plane>, at most 15 chars
_SYSCTL = re.compile(r"^net\.[a-z0-9_.-]+$")  # per-namespace keys only: never the machine's own settings
FIRST_POD_HOST = 10  # pods get hosts 10, 11, ... of each plane subnet; the node takes host 1


@dataclass(frozen=True, slots=True)
class LabPlane:
    name: str
    ipv4: IPNetwork | None
    ipv6: IPNetwork | None
    table: int | None = None  # the node routes this plane in its own table (host routes + `iif` rules)

    def subnet(self, version: int) -> IPNetwork | None:
        return self.ipv4 if version == 4 else self.ipv6


@dataclass(frozen=True, slots=True)
class LabPod:
    name: str
    planes: tuple[str, ...]
    forwarding: bool = False  # a router: forwards between its interfaces (no reverse-path filter)
    gateway: str | None = None  # plane whose node address is this pod's default route


@dataclass(frozen=True, slots=True)
class LabSpec:
    name: str
    planes: tuple[LabPlane, ...]
    pods: tuple[LabPod, ...]
    node_default_via: tuple[str, str] | None = None  # (pod, plane): the node's main-table default route
    node_sysctls: tuple[tuple[str, str], ...] = ()  # (net.* key, value), written in the node's namespace

    def plane(self, name: str) -> LabPlane:
        for plane in self.planes:
            if plane.name == name:
                return plane
        raise KeyError(name)

    def pod(self, name: str) -> LabPod:
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise KeyError(name)

    def node_address(self, plane: str, version: int) -> str | None:
        net = self.plane(plane).subnet(version)
        return str(net[1]) if net is not None else None

    def pod_address(self, pod: str, plane: str, version: int) -> str | None:
        if plane not in self.pod(pod).planes:
            raise KeyError(f"pod {pod!r} has no interface on plane {plane!r}")
        net = self.plane(plane).subnet(version)
        index = [p.name for p in self.pods].index(pod)
        return str(net[FIRST_POD_HOST + index]) if net is not None else None


def _name(raw: Any, path: str) -> str:
    if not isinstance(raw, str) or not _NAME.match(raw):
        raise ConfigError(path, f"{raw!r} is not a lab name (lower-case letter, then up to 7 letters/digits)")
    return raw


def _mapping(raw: Any, path: str, allowed: set[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping with {', '.join(sorted(allowed))}")
    extra = sorted(set(raw) - allowed)
    if extra:
        raise ConfigError(
            f"{path}.{extra[0]}" if path else extra[0], f"unknown field (allowed: {', '.join(sorted(allowed))})"
        )
    return raw


def _table(raw: Any, path: str, taken: dict[int, str], plane: str) -> int | None:
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= MAX_TABLE or raw in RESERVED_TABLES:
        raise ConfigError(path, f"{raw!r} is not a private routing table (1..{MAX_TABLE}, not 253-255)")
    if raw in taken:
        raise ConfigError(path, f"table {raw} is already plane {taken[raw]!r}'s")
    taken[raw] = plane
    return raw


def _parse_plane(p: Any, path: str, tables: dict[int, str]) -> LabPlane:
    p = _mapping(p, path, {"name", "ipv4", "ipv6", "table"})
    v4 = parse_cidr(p["ipv4"], f"{path}.ipv4") if p.get("ipv4") else None
    v6 = parse_cidr(p["ipv6"], f"{path}.ipv6") if p.get("ipv6") else None
    if v4 is not None and v4.version != 4:
        raise ConfigError(f"{path}.ipv4", f"{v4} is not an IPv4 subnet")
    if v6 is not None and v6.version != 6:
        raise ConfigError(f"{path}.ipv6", f"{v6} is not an IPv6 subnet")
    if v4 is None and v6 is None:
        raise ConfigError(path, "a plane needs an ipv4 or an ipv6 subnet")
    name = _name(p.get("name"), f"{path}.name")
    return LabPlane(name, v4, v6, _table(p.get("table"), f"{path}.table", tables, name))


def _parse_pod(p: Any, path: str, known: set[str]) -> LabPod:
    p = _mapping(p, path, {"name", "planes", "forwarding", "gateway"})
    pod_name = _name(p.get("name"), f"{path}.name")
    on = p.get("planes") or []
    for j, plane_name in enumerate(on):
        if plane_name not in known:
            raise ConfigError(
                f"{path}.planes[{j}]", f"unknown plane {plane_name!r} (known: {', '.join(sorted(known))})"
            )
    if len(pod_name) + 1 + max((len(x) for x in on), default=0) > 15:
        raise ConfigError(f"{path}.name", "pod and plane names together exceed the 15-character interface name")
    forwarding = p.get("forwarding", False)
    if not isinstance(forwarding, bool):
        raise ConfigError(f"{path}.forwarding", "expected true or false")
    gateway = p.get("gateway")
    if gateway is not None and gateway not in on:
        raise ConfigError(f"{path}.gateway", f"{gateway!r} is not one of the pod's planes")
    return LabPod(pod_name, tuple(on), forwarding, gateway)


def _parse_node(raw: Any, pods: list[LabPod]) -> tuple[tuple[str, str] | None, tuple[tuple[str, str], ...]]:
    node = _mapping(raw, "node", {"default_via", "sysctls"})
    via = None
    if node.get("default_via") is not None:
        d = _mapping(node["default_via"], "node.default_via", {"pod", "plane"})
        pod = next((p for p in pods if p.name == d.get("pod")), None)
        if pod is None:
            raise ConfigError("node.default_via.pod", f"unknown pod {d.get('pod')!r}")
        if d.get("plane") not in pod.planes:
            raise ConfigError("node.default_via.plane", f"pod {pod.name!r} has no interface on {d.get('plane')!r}")
        via = (pod.name, d["plane"])
    sysctls: dict[str, str] = {}
    raw_sysctls = node.get("sysctls") or {}
    if not isinstance(raw_sysctls, dict):
        raise ConfigError("node.sysctls", "expected a mapping of net.* keys to values")
    for key, value in raw_sysctls.items():
        if not isinstance(key, str) or not _SYSCTL.match(key):
            raise ConfigError(f"node.sysctls.{key}", "only net.* keys (they live in the node's namespace)")
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ConfigError(f"node.sysctls.{key}", f"expected a number or a string, got {value!r}")
        sysctls[key] = str(value)
    return via, tuple(sysctls.items())


def lab_from_dict(raw: Any) -> LabSpec:
    if not isinstance(raw, dict):
        raise ConfigError("", "a lab file holds a mapping with name, planes and pods")
    _mapping(raw, "", {"name", "planes", "pods", "node"})
    name = _name(raw.get("name"), "name")
    planes: list[LabPlane] = []
    tables: dict[int, str] = {}
    for i, p in enumerate(raw.get("planes") or []):
        plane = _parse_plane(p, f"planes[{i}]", tables)
        if any(q.name == plane.name for q in planes):
            raise ConfigError(f"planes[{i}].name", f"plane {plane.name!r} is declared twice")
        planes.append(plane)
    if not planes:
        raise ConfigError("planes", "a lab needs at least one plane")
    pods: list[LabPod] = []
    known = {p.name for p in planes}
    for i, p in enumerate(raw.get("pods") or []):
        pod = _parse_pod(p, f"pods[{i}]", known)
        if pod.name == "node" or any(q.name == pod.name for q in pods):
            raise ConfigError(f"pods[{i}].name", f"pod name {pod.name!r} is taken")
        pods.append(pod)
    for plane in planes:
        for net in (plane.ipv4, plane.ipv6):
            if net is not None and net.size < FIRST_POD_HOST + len(pods) + 1:
                raise ConfigError(f"planes.{plane.name}", f"{net} is too small for {len(pods)} pods")
    via, sysctls = _parse_node(raw.get("node"), pods)
    return LabSpec(name=name, planes=tuple(planes), pods=tuple(pods), node_default_via=via, node_sysctls=sysctls)


def spec_to_dict(spec: LabSpec) -> dict[str, Any]:
    """The YAML shape of a spec (lab_from_dict(spec_to_dict(s)) == s)."""
    out: dict[str, Any] = {
        "name": spec.name,
        "planes": [
            {
                "name": p.name,
                **({"ipv4": str(p.ipv4)} if p.ipv4 else {}),
                **({"ipv6": str(p.ipv6)} if p.ipv6 else {}),
                **({"table": p.table} if p.table is not None else {}),
            }
            for p in spec.planes
        ],
        "pods": [
            {
                "name": p.name,
                "planes": list(p.planes),
                **({"forwarding": True} if p.forwarding else {}),
                **({"gateway": p.gateway} if p.gateway else {}),
            }
            for p in spec.pods
        ],
    }
    node: dict[str, Any] = {}
    if spec.node_default_via is not None:
        node["default_via"] = {"pod": spec.node_default_via[0], "plane": spec.node_default_via[1]}
    if spec.node_sysctls:
        node["sysctls"] = dict(spec.node_sysctls)
    if node:
        out["node"] = node
    return out
