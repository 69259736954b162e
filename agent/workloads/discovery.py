"""Which workloads run on this node, from a Kubernetes PodList or from a workloads file. Pure parsing.

PodList (the API server's `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`, or the kubelet's `/pods`):
a pod is a local workload when it runs on this node, is `Running`, is not being deleted, does not use the
host network, has no sidecar of its own (no `istio-proxy` container: it is its own proxy), is not opted out
(`planemesh.io/workload: "false"` label or annotation), is not in an excluded namespace, and has at least one
address on a plane. Its addresses are `status.podIPs` plus every
`ips` entry of the NPWG network-status annotation (`k8s.v1.cni.cncf.io/network-status`, written by Multus
and other multi-network CNIs for the secondary interfaces), kept when they lie in a plane's CIDRs.

Workloads file (labs, nodes without Kubernetes), YAML or JSON:

    workloads:
      - {name: reviews-v1, namespace: default, addresses: [198.18.1.10, 198.18.2.10],
         labels: {app: reviews, version: v1}, service_account: bookinfo-reviews}
"""

from __future__ import annotations

import json
from typing import Any

from planemesh.agent.workloads.model import (
    Workload,
    WorkloadError,
    WorkloadSet,
    check_address,
    check_name,
    plane_addresses,
)
from planemesh.model.planes import Plane

NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
OPT_OUT = "planemesh.io/workload"  # "false": the agent leaves this pod alone
SIDECAR = "istio-proxy"  # the injected sidecar's container name (a container, or a native sidecar init container)
DEFAULT_EXCLUDED_NAMESPACES = ("kube-system", "istio-system", "planemesh-system")
_FILE_FIELDS = {"name", "namespace", "addresses", "labels", "service_account", "uid"}


def network_status_addresses(text: Any) -> list[str]:
    """Every `ips` entry of an NPWG network-status annotation; [] for a missing or malformed one."""
    if not isinstance(text, str):
        return []
    try:
        entries = json.loads(text)
    except ValueError:
        return []
    out: list[str] = []
    for entry in entries if isinstance(entries, list) else []:
        ips = entry.get("ips") if isinstance(entry, dict) else None
        out += [ip for ip in ips if isinstance(ip, str)] if isinstance(ips, list) else []
    return out


def _str_map(raw: Any) -> dict[str, str]:
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(raw, dict) else {}


def pod_workload(
    pod: Any, planes: tuple[Plane, ...], node_name: str | None, excluded: tuple[str, ...]
) -> Workload | None:
    """One PodList item -> its Workload, or None when the pod is not a local workload (module docstring).
    Raises WorkloadError for a pod whose name or namespace is not a Kubernetes name."""
    if not isinstance(pod, dict):
        raise WorkloadError("pod", f"expected an object, got {type(pod).__name__}")
    meta, spec, status = (pod.get(k) if isinstance(pod.get(k), dict) else {} for k in ("metadata", "spec", "status"))
    namespace = check_name(meta.get("namespace", "default"), "metadata.namespace")
    name = check_name(meta.get("name"), f"{namespace}/metadata.name")
    labels, annotations = _str_map(meta.get("labels")), _str_map(meta.get("annotations"))
    if node_name is not None and spec.get("nodeName") != node_name:
        return None
    if namespace in excluded or spec.get("hostNetwork") is True or meta.get("deletionTimestamp"):
        return None
    if status.get("phase") != "Running" or "false" in (labels.get(OPT_OUT), annotations.get(OPT_OUT)):
        return None
    containers = [*(spec.get("containers") or ()), *(spec.get("initContainers") or ())]
    if any(isinstance(c, dict) and c.get("name") == SIDECAR for c in containers):
        return None
    ips = [e.get("ip") for e in status.get("podIPs") or () if isinstance(e, dict)]
    if isinstance(status.get("podIP"), str):
        ips.insert(0, status["podIP"])
    ips += network_status_addresses(annotations.get(NETWORK_STATUS))
    addresses = plane_addresses([ip for ip in ips if _is_address(ip)], planes)
    if not addresses:
        return None
    account = spec.get("serviceAccountName") or "default"
    return Workload(
        name=name,
        namespace=namespace,
        addresses=addresses,
        labels=tuple(sorted(labels.items())),
        service_account=account if isinstance(account, str) else "default",
        uid=meta.get("uid") if isinstance(meta.get("uid"), str) else "",
    )


def _is_address(raw: Any) -> bool:
    try:
        check_address(raw, "")
    except WorkloadError:
        return False
    return True


def workloads_from_pod_list(
    raw: Any,
    planes: tuple[Plane, ...],
    node_name: str | None,
    excluded: tuple[str, ...] = DEFAULT_EXCLUDED_NAMESPACES,
) -> tuple[WorkloadSet, list[str]]:
    """A PodList -> (the local workloads, one error line per pod skipped as malformed). A malformed pod never
    hides the others; a response that is not a PodList is a WorkloadError."""
    if not isinstance(raw, dict) or not isinstance(raw.get("items"), list):
        raise WorkloadError("PodList", "expected an object with an `items` list")
    found: dict[str, Workload] = {}
    errors: list[str] = []
    for i, pod in enumerate(raw["items"]):
        try:
            workload = pod_workload(pod, planes, node_name, excluded)
        except WorkloadError as exc:
            errors.append(f"items[{i}].{exc}")
            continue
        if workload is not None:
            found[workload.key] = workload
    return WorkloadSet(found), errors


def workloads_from_file_dict(raw: Any, planes: tuple[Plane, ...]) -> WorkloadSet:
    """The workloads file (module docstring) -> WorkloadSet. Any error names its field; nothing is taken."""
    if not isinstance(raw, dict) or set(raw) - {"workloads"}:
        raise WorkloadError("workloads file", "expected a mapping with one key, `workloads`")
    items = raw.get("workloads") or []
    if not isinstance(items, list):
        raise WorkloadError("workloads", f"expected a list, got {type(items).__name__}")
    found: dict[str, Workload] = {}
    for i, item in enumerate(items):
        path = f"workloads[{i}]"
        if not isinstance(item, dict):
            raise WorkloadError(path, f"expected a mapping, got {type(item).__name__}")
        if extra := sorted(set(item) - _FILE_FIELDS):
            raise WorkloadError(f"{path}.{extra[0]}", f"unknown field (allowed: {', '.join(sorted(_FILE_FIELDS))})")
        raw_addresses = item.get("addresses")
        if not isinstance(raw_addresses, list) or not raw_addresses:
            raise WorkloadError(f"{path}.addresses", "expected a non-empty list of IP addresses")
        addresses = [check_address(a, f"{path}.addresses[{j}]") for j, a in enumerate(raw_addresses)]
        kept = plane_addresses(addresses, planes)
        if not kept:
            raise WorkloadError(f"{path}.addresses", f"none of {addresses} lies on a plane of this node")
        labels = item.get("labels") or {}
        if not isinstance(labels, dict) or _str_map(labels) != labels:
            raise WorkloadError(f"{path}.labels", "expected a mapping of strings")
        account = item.get("service_account", "default")
        workload = Workload(
            name=check_name(item.get("name"), f"{path}.name"),
            namespace=check_name(item.get("namespace", "default"), f"{path}.namespace"),
            addresses=kept,
            labels=tuple(sorted(labels.items())),
            service_account=check_name(account, f"{path}.service_account"),
            uid=str(item.get("uid", "")),
        )
        if workload.key in found:
            raise WorkloadError(f"{path}.name", f"duplicate workload {workload.key!r}")
        found[workload.key] = workload
    return WorkloadSet(found)
