"""A local workload (a pod of this node) as istiod sees a sidecar: who it is and every plane address it has.

Pure: the node id and node metadata istio-agent would send for this pod, so istiod computes for the node
agent's stream exactly the configuration it would push to the pod's sidecar (docs/workloads.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from planemesh.model.ip import AddrFormatError, IPAddress, IPNetwork
from planemesh.model.planes import Plane, plane_of_address

# A Kubernetes name (DNS-1123 label or subdomain): pod names and namespaces.
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class WorkloadError(ValueError):
    """A workload description is invalid; `path` names the field (`workloads[2].addresses[0]`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True, slots=True)
class Workload:
    name: str  # the pod's name
    namespace: str
    addresses: tuple[str, ...]  # every address of the pod on a plane (primary network and Multus/Knitter ones)
    labels: tuple[tuple[str, str], ...] = ()
    service_account: str = "default"
    uid: str = ""  # the pod's uid: a pod re-created under the same name is a new workload

    @property
    def key(self) -> str:
        """`<name>.<namespace>`: how istiod names a sidecar's pod (the third part of its node id)."""
        return f"{self.name}.{self.namespace}"

    def node_id(self, dns_domain: str = "cluster.local") -> str:
        """istio-agent's node id: `sidecar~<first IP>~<pod>.<ns>~<ns>.svc.<domain>`."""
        return f"sidecar~{self.addresses[0]}~{self.key}~{self.namespace}.svc.{dns_domain}"

    def node_metadata(self, istio_version: str, cluster_id: str) -> dict[str, Any]:
        """The node metadata istiod reads to build a sidecar's configuration (pilot/pkg/model NodeMetadata).
        INSTANCE_IPS lists every plane address: istiod's multi-NIC support keys inbound listeners on it."""
        return {
            "ISTIO_VERSION": istio_version,
            "NAME": self.name,
            "NAMESPACE": self.namespace,
            "LABELS": dict(self.labels),
            "SERVICE_ACCOUNT": self.service_account,
            "INTERCEPTION_MODE": "TPROXY",
            "CLUSTER_ID": cluster_id,
            "INSTANCE_IPS": ",".join(self.addresses),
        }

    def prefixes(self, planes: tuple[Plane, ...], plane: str | None = None) -> tuple[IPNetwork, ...]:
        """The workload's addresses as host prefixes; only those on `plane` when it is named."""
        out = []
        for address in self.addresses:
            if plane is not None:
                owner = plane_of_address(planes, address)
                if owner is None or owner.name != plane:
                    continue
            out.append(IPNetwork(address))  # a host prefix: /32 or /128
        return tuple(out)


@dataclass(frozen=True, slots=True)
class WorkloadSet:
    """The node's workloads, by key. Equality is what the stream manager diffs on."""

    workloads: Mapping[str, Workload] = field(default_factory=dict)

    def diff(self, new: WorkloadSet) -> tuple[list[Workload], list[Workload]]:
        """(started, stopped): a workload whose description changed is stopped and started again (istiod
        reads node metadata once per stream)."""
        stopped = [w for k, w in self.workloads.items() if new.workloads.get(k) != w]
        started = [w for k, w in new.workloads.items() if self.workloads.get(k) != w]
        return started, stopped


def check_address(raw: Any, path: str) -> str:
    if not isinstance(raw, str):
        raise WorkloadError(path, f"expected an IP address, got {raw!r}")
    try:
        ip = IPAddress(raw)
    except (AddrFormatError, ValueError):
        raise WorkloadError(path, f"{raw!r} is not an IP address") from None
    return str(ip)


def check_name(raw: Any, path: str) -> str:
    if not isinstance(raw, str) or not _K8S_NAME.match(raw):
        raise WorkloadError(path, f"{raw!r} is not a Kubernetes name (lower-case alphanumerics, '-', '.')")
    return raw


def plane_addresses(addresses: list[str], planes: tuple[Plane, ...]) -> tuple[str, ...]:
    """The addresses that lie on a plane, in order, without duplicates: the rest is not the agent's business."""
    seen: dict[str, None] = {}
    for address in addresses:
        if plane_of_address(planes, address) is not None:
            seen.setdefault(address, None)
    return tuple(seen)
