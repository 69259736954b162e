"""The bootstrap's `workloads:` section: one ADS stream per local workload instead of one for the node.

    workloads:
      source: kubernetes          # or `file` (labs, nodes without Kubernetes: agent/workloads/discovery.py)
      file: /etc/planemesh/workloads.yaml            # source: file
      kubernetes:                                      # source: kubernetes (in-cluster defaults shown)
        api: https://kubernetes.default.svc            # default: $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
        token_file: /var/run/secrets/kubernetes.io/serviceaccount/token
        ca_file: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
      node_name: worker-1         # default: $PLANEMESH_NODE_ID (the DaemonSet sets it to spec.nodeName)
      poll_interval_s: 2          # file: how often it is read; kubernetes (a watch): the retry delay after a failure
      istio_version: "1.24.0"     # node metadata ISTIO_VERSION (istiod gates features on it)
      cluster_id: Kubernetes      # node metadata CLUSTER_ID
      dns_domain: cluster.local   # the node id's last part: <ns>.svc.<dns_domain>
      exclude_namespaces: [kube-system, istio-system, planemesh-system]
      apply_delay_s: 0.05         # streams' updates within this window are applied to the node together
      istiod_tokens:              # source kubernetes: each pod's stream presents the pod's own token (15012)
        audience: istio-ca        # istiod's token audience (istio-agent's projected token)
        expiration_s: 3600        # requested lifetime (600 .. 86400); renewed at 80 %
        dir: /run/planemesh/istiod-tokens   # private (0700) directory of the token files

Pure: parsing only; every error names its field (`workloads.kubernetes.api`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from planemesh.agent.workloads.discovery import DEFAULT_EXCLUDED_NAMESPACES
from planemesh.model.config import ConfigError

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
NODE_NAME_ENV = "PLANEMESH_NODE_ID"  # deploy/planemesh-daemonset.yaml: valueFrom spec.nodeName


@dataclass(frozen=True, slots=True)
class KubernetesSource:
    api: str
    token_file: str = f"{SA_DIR}/token"
    ca_file: str = f"{SA_DIR}/ca.crt"


@dataclass(frozen=True, slots=True)
class TokenSettings:
    audience: str = "istio-ca"
    expiration_s: int = 3600
    dir: str = "/run/planemesh/istiod-tokens"


@dataclass(frozen=True, slots=True)
class WorkloadSettings:
    source: str  # "file" or "kubernetes"
    file: str | None = None
    kubernetes: KubernetesSource | None = None
    node_name: str | None = None
    poll_interval_s: float = 2.0
    istio_version: str = "1.24.0"
    cluster_id: str = "Kubernetes"
    dns_domain: str = "cluster.local"
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDED_NAMESPACES
    apply_delay_s: float = 0.05
    istiod_tokens: TokenSettings | None = None  # None: every stream presents server.token_file (if any)


_FIELDS = {
    "source", "file", "kubernetes", "node_name", "poll_interval_s", "istio_version", "cluster_id", "dns_domain",
    "exclude_namespaces", "apply_delay_s", "istiod_tokens",
}  # fmt: skip


def _default_api(env: Mapping[str, str]) -> str | None:
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def _text(raw: dict, key: str, path: str, default: str | None = None) -> str | None:
    value = raw.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{path}.{key}", f"expected a non-empty string, got {value!r}")
    return value


def _seconds(raw: dict, key: str, default: float, low: float, high: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"workloads.{key}", f"expected seconds in {low} .. {high}, got {value!r}")
    return float(value)


def _tokens(raw: Any, source: str) -> TokenSettings | None:
    if raw is None:
        return None
    path = "workloads.istiod_tokens"
    if source != "kubernetes":
        raise ConfigError(path, "needs source: kubernetes (tokens come from the API server's TokenRequest)")
    if not isinstance(raw, dict) or set(raw) - {"audience", "expiration_s", "dir"}:
        raise ConfigError(path, "expected a mapping of audience, expiration_s, dir")
    expiration = raw.get("expiration_s", 3600)
    if isinstance(expiration, bool) or not isinstance(expiration, int) or not 600 <= expiration <= 86400:
        raise ConfigError(f"{path}.expiration_s", f"expected whole seconds in 600 .. 86400, got {expiration!r}")
    directory = _text(raw, "dir", path, "/run/planemesh/istiod-tokens") or ""
    if not directory.startswith("/"):
        raise ConfigError(f"{path}.dir", f"expected an absolute path, got {directory!r}")
    return TokenSettings(_text(raw, "audience", path, "istio-ca") or "", expiration, directory)


def settings_from_dict(raw: Any, env: Mapping[str, str] | None = None) -> WorkloadSettings:
    env = os.environ if env is None else env
    if not isinstance(raw, dict):
        raise ConfigError("workloads", f"expected a mapping, got {type(raw).__name__}")
    if extra := sorted(set(raw) - _FIELDS):
        raise ConfigError(f"workloads.{extra[0]}", f"unknown field (allowed: {', '.join(sorted(_FIELDS))})")
    source = raw.get("source")
    if source not in ("file", "kubernetes"):
        raise ConfigError("workloads.source", f"{source!r} is not one of file, kubernetes")
    file = _text(raw, "file", "workloads")
    if source == "file" and file is None:
        raise ConfigError("workloads.file", "missing (source: file reads the workloads from it)")
    kube = None
    if source == "kubernetes":
        k = raw.get("kubernetes") or {}
        if not isinstance(k, dict) or set(k) - {"api", "token_file", "ca_file"}:
            raise ConfigError("workloads.kubernetes", "expected a mapping of api, token_file, ca_file")
        api = _text(k, "api", "workloads.kubernetes", _default_api(env))
        if api is None:
            raise ConfigError("workloads.kubernetes.api", "missing, and KUBERNETES_SERVICE_HOST is not set")
        if not api.startswith(("https://", "http://127.0.0.1:", "http://[::1]:")):
            raise ConfigError("workloads.kubernetes.api", f"{api!r}: https://..., or plain http to loopback only")
        kube = KubernetesSource(
            api=api.rstrip("/"),
            token_file=_text(k, "token_file", "workloads.kubernetes", f"{SA_DIR}/token") or "",
            ca_file=_text(k, "ca_file", "workloads.kubernetes", f"{SA_DIR}/ca.crt") or "",
        )
    node_name = _text(raw, "node_name", "workloads", env.get(NODE_NAME_ENV) or None)
    if source == "kubernetes" and node_name is None:
        raise ConfigError("workloads.node_name", f"missing, and {NODE_NAME_ENV} is not set")
    excluded = raw.get("exclude_namespaces", list(DEFAULT_EXCLUDED_NAMESPACES))
    if not isinstance(excluded, list) or not all(isinstance(n, str) for n in excluded):
        raise ConfigError("workloads.exclude_namespaces", "expected a list of namespaces")
    return WorkloadSettings(
        source=source,
        file=file,
        kubernetes=kube,
        node_name=node_name,
        poll_interval_s=_seconds(raw, "poll_interval_s", 2.0, 0.05, 600),
        istio_version=_text(raw, "istio_version", "workloads", "1.24.0") or "",
        cluster_id=_text(raw, "cluster_id", "workloads", "Kubernetes") or "",
        dns_domain=_text(raw, "dns_domain", "workloads", "cluster.local") or "",
        exclude_namespaces=tuple(excluded),
        apply_delay_s=_seconds(raw, "apply_delay_s", 0.05, 0.0, 5.0),
        istiod_tokens=_tokens(raw.get("istiod_tokens"), source),
    )
