"""The HBONE node settings file (YAML), parsed into one frozen value; every error names its field.

node: {identity: spiffe://cluster.local/ns/planemesh/sa/node-a}
ca: /etc/planemesh/ca/node-a          # a signing CA (Istio's cacerts layout, `planemesh ca intermediate`), or:
ca_api: {address: "istiod:15012", root_cert: /etc/root.pem, token_file: /var/run/token}  # CreateCertificate
listen: "[::]:15008"                   # the HBONE listener
capture:                               # optional: the TC interception of pod traffic to peers' CIDRs
  port: 15001                          #   the transparent listener PROXY verdicts are assigned to
  interfaces: [veth-pod-a]             #   where pod traffic enters the node
  ports: [8080]                        #   destination ports tunnelled (the per-port policy of pm_tc.c)
workloads: {10.81.1.2: spiffe://cluster.local/ns/ran/sa/amf}
peers: [{name: node-b, address: 10.81.0.2, cidrs: [10.81.2.0/24],
         identity: spiffe://cluster.local/ns/planemesh/sa/node-b}]
rbac: [{rules: {action: DENY, policies: {...}}}]   # envoy.filters.http.rbac RBAC messages (AuthorizationPolicy)
wds: {address: "127.0.0.1:18000", node: node-a}  # optional: workloads, peer routes, policies from istio's WDS
                                                 # (+ tls: {ca, server_name}, token_file: as server.tls/token_file;
                                                 # in the agent's bootstrap, those two by default)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from google.protobuf import any_pb2, json_format

from planemesh.agent.hbone.protocol import HBONE_PORT
from planemesh.agent.hbone.routes import HboneConfigError, Routes, _address, _spiffe, parse_routes
from planemesh.agent.identity.cert_client import CaSettings
from planemesh.agent.rbac import RbacFilter
from planemesh.model.config import ConfigError
from planemesh.xds.server_channel import TlsFiles, check_token_file, tls_files_from_dict
from planemesh.xds.translate_rbac import translate_rbac

_FIELDS = {"node", "ca", "ca_api", "listen", "capture", "workloads", "peers", "rbac", "cert_ttl_s", "wds"}
_CA_API_FIELDS = ("address", "root_cert", "server_name", "token_file", "ttl_s", "cluster_id")


@dataclass(frozen=True, slots=True)
class Capture:
    port: int
    interfaces: tuple[str, ...]
    ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Wds:
    """istio's workload discovery over an ADS stream (agent/hbone/wds.py): the server, and this node's name as
    WDS Workloads name it (`node`); peers' `name`s are the other nodes' names."""

    address: str  # host:port or unix:///path
    node: str
    tls: TlsFiles | None = None  # as the bootstrap's server.tls: istiod's 15012 wants its CA (and the token)
    token_file: str | None = None  # `authorization: Bearer`, read on every stream


@dataclass(frozen=True, slots=True)
class HboneSettings:
    identity: str
    ca_dir: Path | None  # the built-in CA's signing intermediate, or None with ca_api
    listen: tuple[str, int]
    routes: Routes
    ca_api: CaSettings | None = None  # certificates by istio's CreateCertificate (agent/hbone/csr_certs.py)
    rbacs: tuple[RbacFilter, ...] = ()
    capture: Capture | None = None
    cert_ttl_s: float = 24 * 3600.0
    extra: Mapping[str, Any] = field(default_factory=dict)
    wds: Wds | None = None


def _port(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise HboneConfigError(f"{where}: a TCP port expected, got {value!r}")
    return value


def parse_rbac(items: object) -> tuple[RbacFilter, ...]:
    if not isinstance(items, list):
        raise HboneConfigError("rbac: a list of RBAC filter configs expected")
    out = []
    for i, item in enumerate(items):
        where = f"rbac[{i}]"
        msg = rbac_pb2.RBAC()
        try:
            json_format.ParseDict(item, msg)
        except (json_format.ParseError, TypeError) as exc:
            raise HboneConfigError(f"{where}: {exc}") from None
        packed = any_pb2.Any()
        packed.Pack(msg)
        try:
            rbac = translate_rbac(packed, where)
        except ConfigError as exc:
            raise HboneConfigError(str(exc)) from None
        if rbac is not None:
            out.append(rbac)
    return tuple(out)


def _capture(raw: object) -> Capture:
    if not isinstance(raw, Mapping):
        raise HboneConfigError("capture: a mapping expected")
    unknown = set(raw) - {"port", "interfaces", "ports"}
    if unknown:
        raise HboneConfigError(f"capture.{sorted(unknown)[0]}: unknown field")
    ifaces = raw.get("interfaces") or []
    if not isinstance(ifaces, list) or not ifaces or not all(isinstance(x, str) for x in ifaces):
        raise HboneConfigError("capture.interfaces: a list of interface names expected")
    ports = raw.get("ports") or []
    if not isinstance(ports, list) or not ports:
        raise HboneConfigError("capture.ports: a list of destination ports expected")
    return Capture(
        _port(raw.get("port", 15001), "capture.port"),
        tuple(ifaces),
        tuple(_port(p, f"capture.ports[{i}]") for i, p in enumerate(ports)),
    )


def _wds(raw: object) -> Wds:
    if not isinstance(raw, Mapping):
        raise HboneConfigError("wds: a mapping expected")
    unknown = set(raw) - {"address", "node", "tls", "token_file"}
    if unknown:
        raise HboneConfigError(f"wds.{sorted(unknown)[0]}: unknown field")
    for key in ("address", "node"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise HboneConfigError(f"wds.{key}: a non-empty string required")
    try:
        tls = tls_files_from_dict(dict(raw["tls"]), "wds.tls") if raw.get("tls") is not None else None
        token = check_token_file(raw["token_file"], "wds.token_file") if raw.get("token_file") is not None else None
    except ConfigError as exc:
        raise HboneConfigError(str(exc)) from None
    return Wds(raw["address"], raw["node"], tls, token)


def _ca_api(raw: object) -> CaSettings:
    """The CreateCertificate endpoint (the agent fills it from its bootstrap's `ca:` section)."""
    if not isinstance(raw, Mapping):
        raise HboneConfigError("ca_api: a mapping expected")
    unknown = set(raw) - set(_CA_API_FIELDS)
    if unknown:
        raise HboneConfigError(f"ca_api.{sorted(unknown)[0]}: unknown field")
    address = raw.get("address")
    if not isinstance(address, str) or not address:
        raise HboneConfigError("ca_api.address: host:port or unix:///path required")
    for key in ("root_cert", "token_file"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value.startswith("/")):
            raise HboneConfigError(f"ca_api.{key}: an absolute path expected, got {value!r}")
    for key in ("server_name", "cluster_id"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise HboneConfigError(f"ca_api.{key}: a string expected")
    ttl = raw.get("ttl_s", 24 * 3600)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 600 <= ttl <= 90 * 86400:
        raise HboneConfigError("ca_api.ttl_s: 600 s .. 90 days")
    return CaSettings(
        address, raw.get("root_cert"), raw.get("server_name"), raw.get("token_file"), float(ttl), raw.get("cluster_id")
    )


def ca_api_dict(settings: CaSettings) -> dict[str, Any]:
    """CaSettings as the `ca_api:` mapping (how the agent passes its bootstrap's CA to the HBONE node)."""
    return {k: getattr(settings, k) for k in _CA_API_FIELDS if getattr(settings, k) is not None}


def parse_settings(raw: object) -> HboneSettings:
    if not isinstance(raw, Mapping):
        raise HboneConfigError("the HBONE settings must be a mapping")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise HboneConfigError(f"{sorted(unknown)[0]}: unknown field")
    node = raw.get("node")
    if not isinstance(node, Mapping) or "identity" not in node:
        raise HboneConfigError("node.identity: required")
    if ("ca" in raw) == ("ca_api" in raw):
        raise HboneConfigError("ca: the node's signing CA directory, or ca_api: a CreateCertificate CA, is required")
    if "ca" in raw and not isinstance(raw["ca"], str):
        raise HboneConfigError("ca: the directory of the node's signing CA is required")
    ttl = raw.get("cert_ttl_s", 24 * 3600.0)
    if not isinstance(ttl, (int, float)) or not 60 <= ttl <= 90 * 86400:
        raise HboneConfigError("cert_ttl_s: 60 s .. 90 days")
    return HboneSettings(
        identity=_spiffe(node["identity"], "node.identity"),
        ca_dir=Path(raw["ca"]) if "ca" in raw else None,
        ca_api=_ca_api(raw["ca_api"]) if "ca_api" in raw else None,
        listen=_address(raw.get("listen", f"[::]:{HBONE_PORT}"), "listen"),
        routes=parse_routes(raw, cidrs_required=raw.get("wds") is None),
        rbacs=parse_rbac(raw.get("rbac") or []),
        capture=_capture(raw["capture"]) if raw.get("capture") is not None else None,
        cert_ttl_s=float(ttl),
        wds=_wds(raw["wds"]) if raw.get("wds") is not None else None,
    )
