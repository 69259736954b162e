"""Host mode for the agent: which cgroups to intercept, and keeping the programs attached to exactly those.

Applications running directly on the node (systemd services) are intercepted at connect() in the cgroups
named by the static configuration and the command line:

    host_mode:
      slices: [telecom.slice]                  # a systemd slice: its cgroup and everything below it
      cgroups: [system.slice/ims.service]      # a cgroup path, relative to the cgroup v2 mount or absolute

    planemesh agent --host-cgroup telecom.slice --host-cgroup system.slice/ims.service   # repeatable
    PLANEMESH_HOST_CGROUP=telecom.slice,system.slice/ims.service                         # the same, comma-separated

A connection belongs to the plane of its destination address (the planes' CIDRs); destinations on no
plane are left alone; per plane, the listener policy decides proxy or bypass, as for the TC program.
Every named cgroup must exist when the agent starts (or reloads): a bad one is a ConfigError naming it,
and nothing is applied.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from planemesh.model.config import ConfigError

if TYPE_CHECKING:
    from planemesh.ebpf.host_redirect import HostMode

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


def resolve(config: HostModeConfig, where: str = "host_mode", mounts: Iterable[str] | None = None) -> tuple[str, ...]:
    """The real paths of the configured cgroups (each one once). ConfigError naming the field of the first
    one that is not an existing cgroup v2 directory."""
    from planemesh.ebpf.host_redirect import HostModeError, cgroup2_mounts, validated_cgroup

    roots = list(cgroup2_mounts() if mounts is None else mounts)

    def field(key: str, i: int) -> str:  # a command-line option is named as such, a YAML field by its path
        return where if where.startswith("--") else f"{where}.{key}[{i}]"

    named = [(field("slices", i), slice_cgroup(s, field("slices", i))) for i, s in enumerate(config.slices)]
    named += [(field("cgroups", i), c) for i, c in enumerate(config.cgroups)]
    paths: list[str] = []
    for name, spec in named:
        if not roots:
            raise ConfigError(name, "no cgroup v2 hierarchy is mounted: host mode needs one")
        candidate = spec if os.path.isabs(spec) else os.path.join(roots[0], spec)
        try:
            real = validated_cgroup(candidate, roots)
        except HostModeError as exc:
            raise ConfigError(name, str(exc)) from None
        if real not in paths:
            paths.append(real)
    return tuple(paths)


def load_host_cgroups(
    cli: Iterable[str], config_file: str | Path | None, mounts: Iterable[str] | None = None
) -> tuple[str, ...]:
    """Every cgroup to intercept: the static configuration's `host_mode:` and the --host-cgroup values."""
    from planemesh.model.static_config import read_yaml_file

    mounts = None if mounts is None else list(mounts)
    paths: list[str] = []
    if config_file is not None:
        raw = read_yaml_file(config_file)
        section = raw.get("host_mode") if isinstance(raw, dict) else None
        paths += resolve(host_mode_from_dict(section), mounts=mounts)
    for path in resolve(cli_specs(cli), where="--host-cgroup", mounts=mounts):
        if path not in paths:
            paths.append(path)
    return tuple(paths)


def sync_cgroups(host: HostMode, wanted: Iterable[str]) -> tuple[list[str], list[str]]:
    """Attach to every wanted cgroup, then detach from the others (control thread). A cgroup that cannot
    be attached rolls back what this call attached and raises ConfigError. Returns (attached, detached)."""
    from planemesh.ebpf.host_redirect import HostModeError

    wanted = list(wanted)
    before = set(host.cgroups)
    added: list[str] = []
    for path in wanted:
        if path in before:
            continue
        try:
            added.append(host.attach(path))
        except HostModeError as exc:
            for done in added:
                host.detach(done)
            raise ConfigError("host_mode", str(exc)) from None
    removed = [path for path in host.cgroups if path not in wanted]
    for path in removed:
        host.detach(path)
    return added, removed


__all__ = [
    "HostModeConfig",
    "cli_specs",
    "host_mode_from_dict",
    "load_host_cgroups",
    "resolve",
    "slice_cgroup",
    "sync_cgroups",
]
