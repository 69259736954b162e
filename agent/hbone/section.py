"""The `hbone:` section of the agent's static configuration or xDS bootstrap: the HBONE node's settings
(agent/hbone/settings.py, the same fields) inside the file the agent already reads. Pure.

    hbone:
      node: {identity: spiffe://cluster.local/ns/planemesh/sa/node-a}
      ca: /etc/planemesh/ca/node-a      # or nothing, in a bootstrap with a `ca:` section: certificates by
                                        # CreateCertificate from that CA (ca_api is filled from it)
      listen: "10.81.0.1:15008"
      capture: {port: 15001, interfaces: [veth-pod-a], ports: [8080]}
      workloads: {10.81.1.2: spiffe://cluster.local/ns/ran/sa/amf}
      peers: [{name: node-b, address: 10.81.0.2, cidrs: [10.81.2.0/24]}]

Errors are ConfigErrors naming the field under `hbone.` (`hbone.peers[0].cidrs[0]: ...`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from planemesh.agent.hbone.routes import HboneConfigError
from planemesh.agent.hbone.settings import HboneSettings, ca_api_dict, parse_settings
from planemesh.agent.identity.cert_client import CaSettings
from planemesh.model.config import ConfigError
from planemesh.xds.server_channel import TlsFiles, tls_files_dict

SECTION = "hbone"


def check(settings: Mapping[str, Any], path: str = SECTION) -> HboneSettings:
    """parse_settings with its errors as ConfigError(`hbone.<field>`)."""
    try:
        return parse_settings(settings)
    except HboneConfigError as exc:
        field, sep, message = str(exc).partition(": ")
        if not sep or " " in field:
            raise ConfigError(path, str(exc)) from None
        raise ConfigError(f"{path}.{field}", message) from None


def section_settings(
    top: Any, ca_api: CaSettings | None = None, server_tls: TlsFiles | None = None, token_file: str | None = None
) -> dict[str, Any] | None:
    """The checked `hbone:` settings of a parsed configuration (None: no section). Without its own `ca` or
    `ca_api`, the section takes `ca_api` (the bootstrap's `ca:` CreateCertificate endpoint). Its `wds` stream
    reaches istiod as the agent's ADS stream does: without its own `tls` or `token_file` key it takes the
    bootstrap's `server.tls` / `server.token_file` (`server_tls`, `token_file`); the key set to null keeps
    the stream plaintext / without a token."""
    if not isinstance(top, Mapping) or top.get(SECTION) is None:
        return None
    raw = top[SECTION]
    if not isinstance(raw, Mapping):
        raise ConfigError(SECTION, f"expected a mapping, got {type(raw).__name__}")
    settings = dict(raw)
    if "ca" not in settings and "ca_api" not in settings and ca_api is not None:
        settings["ca_api"] = ca_api_dict(ca_api)
    wds = settings.get("wds")
    if isinstance(wds, Mapping):
        wds = dict(wds)
        if "tls" not in wds and server_tls is not None:
            wds["tls"] = tls_files_dict(server_tls)
        if "token_file" not in wds and token_file is not None:
            wds["token_file"] = token_file
        settings["wds"] = wds
    check(settings)
    return settings


def settings_from_file(path: Path) -> HboneSettings:
    """`planemesh hbone --config`: HBONE settings, or a static config with an `hbone:` section (a bootstrap's
    `ca:` is not followed here: give the section its own `ca` or `ca_api`). HboneConfigError/ConfigError."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise HboneConfigError(f"{path}: {exc}") from None
    if isinstance(raw, Mapping) and SECTION in raw:
        settings = section_settings(raw)
        if settings is None:
            raise ConfigError(SECTION, "empty")
        return check(settings)
    return parse_settings(raw)
