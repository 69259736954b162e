"""A lab, as declared in YAML: the node, its pods, the planes and who sits on which plane. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from netaddr import IPNetwork

from planemesh.agent.config import ConfigError
from planemesh.agent.static_config import parse_cidr

_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # short: interface names are <pod>-<plane>, at most 15 chars
FIRST_POD_HOST = 10  # pods get hosts 10, 11, ... of each plane subnet; the node takes host 1


@dataclass(frozen=True, slots=True)
class LabPlane:
    name: str
    ipv4: IPNetwork | None
    ipv6: IPNetwork | None

    def subnet(self, version: int) -> IPNetwork | None:
        return self.ipv4 if version == 4 else self.ipv6


@dataclass(frozen=True, slots=True)
class LabPod:
    name: str
    planes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LabSpec:
    name: str
    planes: tuple[LabPlane, ...]
    pods: tuple[LabPod, ...]

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


def lab_from_dict(raw: Any) -> LabSpec:
    if not isinstance(raw, dict):
        raise ConfigError("", "a lab file holds a mapping with name, planes and pods")
    extra = sorted(set(raw) - {"name", "planes", "pods"})
    if extra:
        raise ConfigError(extra[0], "unknown field (allowed: name, planes, pods)")
    name = _name(raw.get("name"), "name")
    planes: list[LabPlane] = []
    for i, p in enumerate(raw.get("planes") or []):
        path = f"planes[{i}]"
        if not isinstance(p, dict):
            raise ConfigError(path, "expected a mapping with name, ipv4 and/or ipv6")
        v4 = parse_cidr(p["ipv4"], f"{path}.ipv4") if p.get("ipv4") else None
        v6 = parse_cidr(p["ipv6"], f"{path}.ipv6") if p.get("ipv6") else None
        if v4 is not None and v4.version != 4:
            raise ConfigError(f"{path}.ipv4", f"{v4} is not an IPv4 subnet")
        if v6 is not None and v6.version != 6:
            raise ConfigError(f"{path}.ipv6", f"{v6} is not an IPv6 subnet")
        if v4 is None and v6 is None:
            raise ConfigError(path, "a plane needs an ipv4 or an ipv6 subnet")
        plane = LabPlane(_name(p.get("name"), f"{path}.name"), v4, v6)
        if any(q.name == plane.name for q in planes):
            raise ConfigError(f"{path}.name", f"plane {plane.name!r} is declared twice")
        planes.append(plane)
    if not planes:
        raise ConfigError("planes", "a lab needs at least one plane")
    pods: list[LabPod] = []
    known = {p.name for p in planes}
    raw_pods = raw.get("pods") or []
    for i, p in enumerate(raw_pods):
        path = f"pods[{i}]"
        if not isinstance(p, dict):
            raise ConfigError(path, "expected a mapping with name and planes")
        pod_name = _name(p.get("name"), f"{path}.name")
        if pod_name == "node" or any(q.name == pod_name for q in pods):
            raise ConfigError(f"{path}.name", f"pod name {pod_name!r} is taken")
        on = p.get("planes") or []
        for j, plane_name in enumerate(on):
            if plane_name not in known:
                raise ConfigError(
                    f"{path}.planes[{j}]", f"unknown plane {plane_name!r} (known: {', '.join(sorted(known))})"
                )
        if len(pod_name) + 1 + max((len(x) for x in on), default=0) > 15:
            raise ConfigError(f"{path}.name", "pod and plane names together exceed the 15-character interface name")
        pods.append(LabPod(pod_name, tuple(on)))
    for plane in planes:
        for net in (plane.ipv4, plane.ipv6):
            if net is not None and net.size < FIRST_POD_HOST + len(pods) + 1:
                raise ConfigError(f"planes.{plane.name}", f"{net} is too small for {len(pods)} pods")
    return LabSpec(name=name, planes=tuple(planes), pods=tuple(pods))
