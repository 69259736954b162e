"""The static YAML configuration (bootstrap without xDS, and the demo's embedded default).

    planes:
      - name: oam
        id: 1
        interfaces: ["*-oam"]
        cidrs: [198.18.1.0/24, fd00:18:1::/64]
        undeclared: bypass          # or sniff
        proxy_port: 15001
        sniff_port: 15002
        sla: {connect_timeout_s: 2, rate_limit_rps: 500, bandwidth_mbit: 100, priority: 1}
        table: 101                  # optional: the plane's routing table on this node (VRF-like nodes)
        forward_to: [sig]           # optional: planes that traffic arriving here may reach (default: none)
    listeners:
      - {plane: oam, port: 80, protocol: http}
      - {plane: oam, port: 8080, protocol: http, trace_sampling: 1}   # % of new traces sampled; null: no tracing
      - {plane: oam, port: 5432, protocol: tcp}

Every error names the field (`planes[0].cidrs[1]: ...`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from planemesh.model.config import DEFAULT_TRACE, ConfigError, Listener, ListenerProtocol, Snapshot
from planemesh.model.ip import AddrFormatError, IPNetwork
from planemesh.model.planes import SLA, Plane, UndeclaredPorts
from planemesh.model.tls_config import plane_tls
from planemesh.model.validation import validate_snapshot
from planemesh.model.yaml_text import YamlError, safe_load

_PLANE_KEYS = {
    "name", "id", "interfaces", "cidrs", "undeclared", "proxy_port", "sniff_port", "sla", "table", "forward_to",
}  # fmt: skip
_LISTENER_KEYS = {"name", "plane", "port", "protocol", "prefixes", "trace_sampling"}
_SLA_FIELDS = {f.name: f for f in dataclasses.fields(SLA)}


def _require(obj: Any, kind: type | tuple[type, ...], path: str, what: str) -> Any:
    if not isinstance(obj, kind) or (isinstance(obj, bool) and kind is not bool):
        raise ConfigError(path, f"expected {what}, got {type(obj).__name__} {obj!r}")
    return obj


def _unknown_keys(obj: dict, allowed: set[str], path: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise ConfigError(f"{path}.{extra[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")


def parse_cidr(value: Any, path: str) -> IPNetwork:
    _require(value, str, path, "a CIDR string")
    try:
        net = IPNetwork(value, flags=0)
    except (AddrFormatError, ValueError, TypeError) as exc:
        raise ConfigError(path, f"{value!r} is not a valid CIDR") from exc
    if "/" not in value:
        raise ConfigError(path, f"{value!r} needs a prefix length")
    return net.cidr


def _parse_sla(raw: Any, path: str) -> SLA:
    if raw is None:
        return SLA()
    _require(raw, dict, path, "a mapping")
    _unknown_keys(raw, set(_SLA_FIELDS), path)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        default = _SLA_FIELDS[key].default
        if isinstance(default, frozenset):
            values[key] = frozenset(_require(value, list, f"{path}.{key}", "a list"))
        elif isinstance(default, bool):
            values[key] = _require(value, bool, f"{path}.{key}", "true or false")
        elif value is None:
            values[key] = None
        elif isinstance(default, str):  # mtls, mtls_cert, mtls_trust
            values[key] = _require(value, str, f"{path}.{key}", "a string")
        elif _SLA_FIELDS[key].type == "str | None":  # cpus: YAML reads a single CPU (`cpus: 1`) as a number
            values[key] = str(_require(value, (str, int), f"{path}.{key}", "a string such as 0-1,3"))
        else:
            values[key] = _require(value, (int, float), f"{path}.{key}", "a number")
            if value < 0:
                raise ConfigError(f"{path}.{key}", "must not be negative")
    return SLA(**values)


def _parse_plane(raw: Any, i: int) -> Plane:
    path = f"planes[{i}]"
    _require(raw, dict, path, "a mapping")
    _unknown_keys(raw, _PLANE_KEYS, path)
    for key in ("name", "id", "interfaces", "cidrs"):
        if key not in raw:
            raise ConfigError(f"{path}.{key}", "missing")
    interfaces = _require(raw["interfaces"], list, f"{path}.interfaces", "a list of interface names or patterns")
    for j, name in enumerate(interfaces):
        _require(name, str, f"{path}.interfaces[{j}]", "an interface name or pattern")
    cidrs = _require(raw["cidrs"], list, f"{path}.cidrs", "a list of CIDRs")
    undeclared = raw.get("undeclared", "bypass")
    try:
        policy = UndeclaredPorts(undeclared)
    except ValueError:
        raise ConfigError(f"{path}.undeclared", f"{undeclared!r} is not one of bypass, sniff") from None
    kwargs: dict[str, Any] = {}
    for key in ("proxy_port", "sniff_port"):
        if key in raw:
            kwargs[key] = _require(raw[key], int, f"{path}.{key}", "a port number")
    if raw.get("table") is not None:
        kwargs["table"] = _require(raw["table"], int, f"{path}.table", "a routing table number")
    forward_to = _require(raw.get("forward_to", []), list, f"{path}.forward_to", "a list of plane names")
    for j, name in enumerate(forward_to):
        _require(name, str, f"{path}.forward_to[{j}]", "a plane name")
    return Plane(
        name=_require(raw["name"], str, f"{path}.name", "a name"),
        plane_id=_require(raw["id"], int, f"{path}.id", "an integer plane id"),
        interfaces=tuple(interfaces),
        cidrs=tuple(parse_cidr(c, f"{path}.cidrs[{j}]") for j, c in enumerate(cidrs)),
        undeclared=policy,
        sla=_parse_sla(raw.get("sla"), f"{path}.sla"),
        forward_to=tuple(forward_to),
        **kwargs,
    )


def _parse_listener(raw: Any, i: int) -> Listener:
    path = f"listeners[{i}]"
    _require(raw, dict, path, "a mapping")
    _unknown_keys(raw, _LISTENER_KEYS, path)
    for key in ("plane", "port"):
        if key not in raw:
            raise ConfigError(f"{path}.{key}", "missing")
    protocol = raw.get("protocol", "http")
    try:
        proto = ListenerProtocol(protocol)
    except ValueError:
        raise ConfigError(f"{path}.protocol", f"{protocol!r} is not one of http, tcp") from None
    port = _require(raw["port"], int, f"{path}.port", "a port number")
    plane = _require(raw["plane"], str, f"{path}.plane", "a plane name")
    prefixes = _require(raw.get("prefixes", []), list, f"{path}.prefixes", "a list of CIDRs")
    return Listener(
        name=raw.get("name") or f"{plane}_{port}",
        plane=plane,
        port=port,
        protocol=proto,
        prefixes=tuple(parse_cidr(p, f"{path}.prefixes[{j}]") for j, p in enumerate(prefixes)),
        trace_sampling=_trace_sampling(raw.get("trace_sampling", DEFAULT_TRACE), f"{path}.trace_sampling"),
    )


def _trace_sampling(value: Any, path: str) -> float | None:
    """A listener's trace sampling: a percentage of new traces (0 to 100), or null for no trace context."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise ConfigError(path, f"{value!r} is not a percentage (0 to 100) or null")
    return float(value)


def snapshot_from_dict(raw: Any, version: str = "static") -> Snapshot:
    _require(raw, dict, "", "a mapping at the top level")
    # host_mode: node-local cgroups to intercept, read by planemesh.agent.host_attach; node_overload: priority
    # between planes under node-wide overload, read by planemesh.agent.node_overload; hbone: the node's HBONE
    # (node-to-node mTLS), checked and run by the agent (planemesh.agent.hbone.section; none is in a Snapshot).
    _unknown_keys(raw, {"planes", "listeners", "host_mode", "node_overload", "hbone"}, "config")
    planes = _require(raw.get("planes"), list, "planes", "a list of planes")
    listeners = _require(raw.get("listeners", []), list, "listeners", "a list of listeners")
    snap = Snapshot(
        version=version,
        planes=tuple(_parse_plane(p, i) for i, p in enumerate(planes)),
        listeners=tuple(_parse_listener(x, i) for i, x in enumerate(listeners)),
    )
    validate_snapshot(snap)
    return snap


def read_yaml_file(path: str | Path) -> Any:
    """A YAML file's content; unreadable or invalid files are a one-line ConfigError (configs, bootstraps, labs)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from exc
    try:
        return safe_load(text)  # PyYAML's, in a child process when this one has not loaded it (the agent)
    except YamlError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc


def load_static_config(path: str | Path) -> Snapshot:
    return snapshot_from_dict(read_yaml_file(path), version=f"static:{Path(path).name}")


DEFAULT_CONFIG = "default-config.yaml"


def default_config_text() -> str:
    # The file next to this module (package data of the wheel): importlib.resources would cost the agent ~1 MB
    # of RSS (tempfile, shutil, bz2, lzma, zipfile; docs/benchmarks.md, lean4).
    return (Path(__file__).parent / DEFAULT_CONFIG).read_text()


def load_default_config() -> Snapshot:
    return snapshot_from_dict(safe_load(default_config_text()), version="static:embedded-default")


def load_static_snapshot(path: str | Path | None) -> Snapshot:
    """The agent's whole configuration without xDS (`--config`, else the embedded default). Its planes alone may
    require mTLS when they are a bootstrap's or an embedded xDS server's (load_static_config), where SDS or the
    CSR flow brings the Secrets; here nothing does (check_static_mtls)."""
    snap = load_static_config(path) if path else load_default_config()
    check_static_mtls(snap)
    return snap


def check_static_mtls(snap: Snapshot) -> None:
    """A static configuration has no Secrets (no SDS, no CSR flow, no TLS material of its own): a plane whose SLA
    requires mTLS (strict / permissive) would refuse every mTLS handshake, silently. Refused by name instead."""
    for i, plane in enumerate(snap.planes):
        if (ctx := plane_tls(plane.sla)) is None:
            continue
        for key, name in (("mtls_cert", ctx.cert), ("mtls_trust", ctx.trust)):
            if name not in snap.secrets:
                raise ConfigError(
                    f"planes[{i}].sla.{key}",
                    f"plane {plane.name!r} requires mTLS ({plane.sla.mtls}) but the static configuration has no "
                    f"Secret {name!r} (serve it over xDS/SDS: --bootstrap or --xds-resources, or use the bootstrap's "
                    "ca: section)",
                )
