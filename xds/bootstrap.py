"""The xDS bootstrap file: who this node is, where the management server is, and the node's planes.

    node:
      id: node-1
      cluster: planemesh
      metadata: {ISTIO_VERSION: "1.24.0", NAMESPACE: default}   # optional: merged into node.metadata
    server:
      address: "127.0.0.1:18000"      # host:port, [v6]:port or unix:///path
      mode: sotw                      # or delta
      tls: {ca: /etc/pm/ca.pem, cert: /etc/pm/node.pem, key: /etc/pm/node.key, server_name: xds.example}
      token_file: /var/run/secrets/tokens/istio-token   # optional: `authorization: Bearer <JWT>`
      max_receive_bytes: 268435456    # largest response accepted (gRPC receive limit), default 256 MiB
    timing: {initial_fetch_timeout_s: 15, backoff_base_s: 0.5, backoff_max_s: 30}
    ca: {trust_domain: cluster.local, ttl_s: 86400}   # optional: SDS `default`/`ROOTCA` by istio's CSR flow
        # (CreateCertificate); address, root_cert, server_name and token_file default to server's
    planes: [...]                     # the static configuration's `planes:` (model/static_config.py)
    host_mode: {slices: [telecom.slice], cgroups: [...]}   # optional: host-mode cgroups (agent/host_attach.py)
    workloads: {source: kubernetes}   # optional: one ADS stream per local workload (agent/workloads/settings.py)
    hbone: {node: ..., peers: [...]}  # optional: node-to-node mTLS run by the agent (agent/hbone/section.py);
        # without its own `ca`, certificates by CreateCertificate from the `ca:` section

Planes are local knowledge (interfaces and CIDRs of this node), so they come from here, not from xDS;
every error names its field like the static configuration's.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planemesh.agent.hbone.section import section_settings
from planemesh.agent.identity.cert_client import CaSettings
from planemesh.agent.identity.cert_types import MAX_WORKLOAD_TTL_S
from planemesh.agent.identity.spiffe import SpiffeError, SpiffeId, istio_identity
from planemesh.agent.workloads.settings import WorkloadSettings, settings_from_dict
from planemesh.model.config import ConfigError
from planemesh.model.host_mode import host_mode_from_dict
from planemesh.model.node import NodeIdentity
from planemesh.model.planes import Plane
from planemesh.model.static_config import read_yaml_file, snapshot_from_dict
from planemesh.xds.client_state import Mode
from planemesh.xds.server_channel import TlsFiles, check_token_file, tls_files_from_dict

# istiod pushes a whole sidecar configuration in one response; Envoy accepted 70 MiB in the test
# and Envoy's own gRPC client has no receive limit unless max_receive_message_length is set, so the limit
# only guards memory: 256 MiB (grpc's default, 4 MiB, is far too small for a mesh).
MAX_RECEIVE_BYTES = 256 << 20
# Certificates are backdated 60 s (agent/identity/ca.py) and rotated at half-life from notBefore, so a
# lifetime near a minute would be renewed at once; ten minutes leaves 4.5 minutes between renewals.
MIN_TTL_S = 600


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
    token_file: str | None = None  # re-read on every (re)connect: Kubernetes rotates projected tokens
    max_receive_bytes: int = MAX_RECEIVE_BYTES
    node_metadata: tuple[tuple[str, Any], ...] = ()  # extra node.metadata (istiod: ISTIO_VERSION, NAMESPACE...)
    workloads: WorkloadSettings | None = None  # set: one stream per local workload, not one for the node
    ca: CaSettings | None = None  # workload certificate by CreateCertificate (agent/identity/cert_client.py)
    identity: SpiffeId | None = None  # the SPIFFE ID asked for (with `ca`)


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
    top = _mapping(
        raw, "bootstrap",
        {"node", "server", "planes", "timing", "host_mode", "node_overload", "workloads", "ca", "hbone"},
    )  # fmt: skip
    if "host_mode" in top:  # read by the agent (planemesh.agent.host_attach); checked here so errors come early
        host_mode_from_dict(top["host_mode"])
    node = _mapping(top.get("node"), "node", {"id", "cluster", "metadata"})
    server = _mapping(top.get("server"), "server", {"address", "mode", "tls", "token_file", "max_receive_bytes"})
    timing = _mapping(top.get("timing"), "timing", {"initial_fetch_timeout_s", "backoff_base_s", "backoff_max_s"})
    mode = server.get("mode", "sotw")
    if mode not in ("sotw", "delta"):
        raise ConfigError("server.mode", f"{mode!r} is not one of sotw, delta")
    tls = tls_files_from_dict(server["tls"], "server.tls") if "tls" in server else None
    times: dict[str, float] = {}
    for key, value in timing.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"timing.{key}", f"expected a positive number, got {value!r}")
        times[key] = float(value)
    token_file = server.get("token_file")
    if token_file is not None:
        check_token_file(token_file, "server.token_file")
    limit = server.get("max_receive_bytes", MAX_RECEIVE_BYTES)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 << 20 <= limit <= (1 << 31) - 1:
        raise ConfigError("server.max_receive_bytes", f"expected bytes in 1 MiB .. 2 GiB - 1, got {limit!r}")
    meta = _mapping(node.get("metadata"), "node.metadata", set(node.get("metadata") or {}))
    for key, value in meta.items():
        if not isinstance(key, str) or not _json_value(value):
            raise ConfigError(f"node.metadata.{key}", "expected a string key and a JSON value")
    planes = snapshot_from_dict({"planes": top.get("planes")}, version="bootstrap").planes
    ca, identity = _ca(top["ca"], server, tls, token_file, dict(meta)) if "ca" in top else (None, None)
    section_settings(top, ca)  # the agent runs it (agent/hbone/supervisor.py); checked here so errors come early
    return Bootstrap(
        node_id=_str(node, "id", "node"),
        cluster=_str(node, "cluster", "node", "planemesh"),
        server=check_target(server.get("address"), "server.address"),
        planes=planes,
        mode=Mode(mode),
        tls=tls,
        token_file=token_file,
        max_receive_bytes=limit,
        node_metadata=tuple(sorted(meta.items())),
        workloads=settings_from_dict(top["workloads"]) if "workloads" in top else None,
        ca=ca,
        identity=identity,
        **times,
    )


def _ca(
    raw: Any, server: dict, tls: TlsFiles | None, token_file: str | None, meta: dict
) -> tuple[CaSettings, SpiffeId]:
    """The `ca:` section: where istio's CreateCertificate is served and which identity to ask for
    (istio-agent: CA_ADDR defaults to the discovery address, NAMESPACE/SERVICE_ACCOUNT from the pod)."""
    ca = _mapping(
        raw or {}, "ca", {"address", "root_cert", "server_name", "token_file", "ttl_s", "trust_domain", "cluster_id"}
    )
    ttl = ca.get("ttl_s", 86400)
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not MIN_TTL_S <= ttl <= MAX_WORKLOAD_TTL_S:
        raise ConfigError("ca.ttl_s", f"expected seconds in {MIN_TTL_S} .. {MAX_WORKLOAD_TTL_S}, got {ttl!r}")
    for key in ("root_cert", "token_file"):
        if key in ca and (not isinstance(ca[key], str) or not ca[key].startswith("/")):
            raise ConfigError(f"ca.{key}", f"expected an absolute path, got {ca[key]!r}")
    trust_domain = _str(ca, "trust_domain", "ca", "cluster.local")
    namespace, account = meta.get("NAMESPACE"), meta.get("SERVICE_ACCOUNT")
    if not isinstance(namespace, str) or not isinstance(account, str):
        raise ConfigError("node.metadata", "ca: needs NAMESPACE and SERVICE_ACCOUNT (the identity to ask for)")
    try:
        identity = istio_identity(trust_domain, namespace, account)
    except SpiffeError as exc:
        raise ConfigError("node.metadata", str(exc)) from None
    settings = CaSettings(
        address=check_target(ca.get("address", server.get("address")), "ca.address"),
        root_cert=ca.get("root_cert", tls.ca if tls is not None else None),
        server_name=ca.get("server_name", tls.server_name if tls is not None else None),
        token_file=ca.get("token_file", token_file),
        ttl_s=float(ttl),
        cluster_id=ca.get("cluster_id"),
    )
    return settings, identity


def _json_value(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_value(v) for k, v in value.items())
    return False


def load_bootstrap(path: str | Path) -> Bootstrap:
    return bootstrap_from_dict(read_yaml_file(path))


def with_node(boot: Bootstrap, node: NodeIdentity) -> Bootstrap:
    """The bootstrap with the node identity the orchestrator gave (--node-id, --node-ip, --pod-name) applied."""
    metadata = node.metadata(dict(boot.node_metadata))
    return dataclasses.replace(
        boot, node_id=node.node_id or boot.node_id, node_metadata=tuple(sorted(metadata.items()))
    )
