"""The `host_mode:` section (static configuration or bootstrap) and --host-cgroup values, parsed. Pure: nothing is
looked up on disk (agent/host_attach.py resolves the cgroups and keeps the programs attached to them).

    host_mode:
      slices: [telecom.slice]                  # a systemd slice: its cgroup and everything below it
      cgroups: [system.slice/ims.service]      # a cgroup path, relative to the cgroup v2 mount or absolute
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from planemesh.model.config import ConfigError

# systemd unit name characters (systemd escapes everything else as \xNN); a slice's dashes are its nesting.
_SLICE = re.compile(r"^[A-Za-z0-9:_.\\]+(-[A-Za-z0-9:_.\\]+)*\.slice$")
ROOT_SLICE = "-.slice"


@dataclass(frozen=True, slots=True)
class HostModeConfig:
    cgroups: tuple[str, ...] = ()  # paths as written (relative to the cgroup v2 mount, or absolute)
    slices: tuple[str, ...] = ()  # systemd slice names


def slice_cgroup(name: str, path: str = "slices") -> str:
    """A systemd slice's cgroup, relative to the cgroup v2 mount: `a-b.slice` -> `a.slice/a-b.slice`."""
    if name == ROOT_SLICE:
        return "."
    if not isinstance(name, str) or not _SLICE.match(name):
        raise ConfigError(path, f"{name!r} is not a systemd slice name (like telecom.slice or telecom-media.slice)")
    parts = name.removesuffix(".slice").split("-")
    return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def host_mode_from_dict(raw: Any, path: str = "host_mode") -> HostModeConfig:
    """Parse the `host_mode:` section (None: host mode off). Pure: nothing is looked up on disk."""
    if raw is None:
        return HostModeConfig()
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping with cgroups and/or slices, got {type(raw).__name__}")
    extra = sorted(set(raw) - {"cgroups", "slices"})
    if extra:
        raise ConfigError(f"{path}.{extra[0]}", "unknown field (allowed: cgroups, slices)")
    found: dict[str, tuple[str, ...]] = {}
    for key in ("cgroups", "slices"):
        items = raw.get(key) or []
        if not isinstance(items, list):
            raise ConfigError(f"{path}.{key}", f"expected a list, got {type(items).__name__}")
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item:
                raise ConfigError(f"{path}.{key}[{i}]", f"expected a non-empty string, got {item!r}")
            if key == "slices":
                slice_cgroup(item, f"{path}.{key}[{i}]")
        found[key] = tuple(items)
    return HostModeConfig(**found)


def cli_specs(values: Iterable[str]) -> HostModeConfig:
    """--host-cgroup values: a bare `*.slice` name is a systemd slice, anything else a cgroup path."""
    cgroups, slices = [], []
    for value in values:
        for spec in (v.strip() for v in value.split(",")):
            if not spec:
                continue
            (slices if "/" not in spec and spec.endswith(".slice") else cgroups).append(spec)
    return HostModeConfig(tuple(cgroups), tuple(slices))
