"""Does the agent's configuration have an `hbone:` section? Light on purpose: the daemon imports this at start,
and only a file with the section loads the HBONE modules (and `cryptography`, for its certificates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planemesh.model.static_config import read_yaml_file

SECTION = "hbone"  # section.SECTION (not imported: it would load the HBONE modules)


def load_hbone_section(config: Path | None, bootstrap: Path | None) -> dict[str, Any] | None:
    """The checked section of the static config (or else the bootstrap); None without one. ConfigError."""
    path = config or bootstrap
    if path is None:
        return None
    raw = read_yaml_file(path)
    if not isinstance(raw, dict) or raw.get(SECTION) is None:
        return None
    from planemesh.agent.hbone.supervisor import load_hbone  # RSS: cryptography only for agents that run HBONE

    return load_hbone(config, bootstrap)
