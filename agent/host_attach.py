"""Host mode for the agent: which cgroups to intercept, and keeping the programs attached to exactly those.
(The `host_mode:` section and --host-cgroup values are parsed by planemesh.model.host_mode, pure.)

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
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from planemesh.model.config import ConfigError
from planemesh.model.host_mode import (  # noqa: F401  (re-exported for code written before the split)
    ROOT_SLICE,
    HostModeConfig,
    cli_specs,
    host_mode_from_dict,
    slice_cgroup,
)

if TYPE_CHECKING:
    from planemesh.ebpf.host_redirect import HostMode

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
