"""The xDS bootstrap file: who this node is, where the management server is, and the node's planes.

    node: {id: node-1, cluster: planemesh}
    server:
      address: "127.0.0.1:18000"      # host:port, [v6]:port or unix:///path
      mode: sotw                      # or delta
      tls: {ca: /etc/pm/ca.pem, cert: /etc/pm/node.pem, key: /etc/pm/node.key, server_name: xds.example}
    timing: {initial_fetch_timeout_s: 15, backoff_base_s: 0.5, backoff_max_s: 30}
    planes: [...]                     # the static configuration's `planes:` (agent/static_config.py)
    host_mode: {slices: [telecom.slice], cgroups: [...]}   # optional: host-mode cgroups (agent/host_mode.py)

Planes are local knowledge (interfaces and CIDRs of this node), so they come from here, not from xDS;
every error names its field like the static configuration's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planemesh.agent.config import ConfigError
from planemesh.agent.static_config import read_yaml_file, snapshot_from_dict
from planemesh.netplanes.model import Plane
from planemesh.xds.client_state import Mode


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca: str
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class Bootstrap:
    node_id: str
    cluster: str
    server: str
    planes: tuple[Plane, ...]
    mode: Mode = Mode.SOTW
    tls: TlsFiles | None = None
    initial_fetch_timeout_s: float = 15.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0


_TARGET = re.compile(r"^(unix:(//)?/.+|\[[0-9a-fA-F:.]+\]:\d{1,5}|[A-Za-z0-9_.-]+:\d{1,5})$")


def check_target(address: Any, path: str) -> str:
    if not isinstance(address, str) or not _TARGET.match(address):
        raise ConfigError(path, f"{address!r} is not host:port, [v6]:port or unix:///path")
    if not address.startswith("unix:") and not 1 <= int(address.rsplit(":", 1)[1]) <= 65535:
        raise ConfigError(path, f"{address!r} has no valid port")
    return address


def _mapping(raw: Any, path: str, allowed: set[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping, got {type(raw).__name__}")
    extra = sorted(set(raw) - allowed)
    if extra:
        raise ConfigError(f"{path}.{extra[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
    return raw


def _str(raw: dict, key: str, path: str, default: str | None = None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}.{key}", "missing" if value is None else f"expected a string, got {value!r}")
    return value


def bootstrap_from_dict(raw: Any) -> Bootstrap:
    top = _mapping(raw, "bootstrap", {"node", "server", "planes", "timing", "host_mode"})
    if "host_mode" in top:  # read by the agent (planemesh.agent.host_mode); checked here so errors come early
        from planemesh.agent.host_mode import host_mode_from_dict

        host_mode_from_dict(top["host_mode"])
    node = _mapping(top.get("node"), "node", {"id", "cluster"})
    server = _mapping(top.get("server"), "server", {"address", "mode", "tls"})
    timing = _mapping(top.get("timing"), "timing", {"initial_fetch_timeout_s", "backoff_base_s", "backoff_max_s"})
    mode = server.get("mode", "sotw")
    if mode not in ("sotw", "delta"):
        raise ConfigError("server.mode", f"{mode!r} is not one of sotw, delta")
    tls = None
    if "tls" in server:
        t = _mapping(server["tls"], "server.tls", {"ca", "cert", "key", "server_name"})
        if ("cert" in t) != ("key" in t):
            raise ConfigError("server.tls", "cert and key go together")
        tls = TlsFiles(
            ca=_str(t, "ca", "server.tls"),
            cert=t.get("cert"),
            key=t.get("key"),
            server_name=t.get("server_name"),
        )
    times: dict[str, float] = {}
    for key, value in timing.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"timing.{key}", f"expected a positive number, got {value!r}")
        times[key] = float(value)
    planes = snapshot_from_dict({"planes": top.get("planes")}, version="bootstrap").planes
    return Bootstrap(
        node_id=_str(node, "id", "node"),
        cluster=_str(node, "cluster", "node", "planemesh"),
        server=check_target(server.get("address"), "server.address"),
        planes=planes,
        mode=Mode(mode),
        tls=tls,
        **times,
    )


def load_bootstrap(path: str | Path) -> Bootstrap:
    return bootstrap_from_dict(read_yaml_file(path))
