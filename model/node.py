"""Who this node agent is, as the orchestrator tells it (flags or the DaemonSet's downward-API variables).

planemesh.xds.bootstrap.with_node() puts it into the xDS Node the agent sends: `node.id` replaced, and the
node metadata keys Istio's proxies send (INSTANCE_IPS, NAME) added where the bootstrap does not set them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from planemesh.model.config import ConfigError
from planemesh.model.ip import AddrFormatError, IPAddress


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str | None = None  # --node-id / PLANEMESH_NODE_ID: the xDS node.id (Kubernetes: the node name)
    node_ips: tuple[str, ...] = ()  # --node-ip / PLANEMESH_NODE_IPS (else PLANEMESH_NODE_IP)
    pod_name: str | None = None  # --pod-name / PLANEMESH_POD_NAME: the agent's own pod

    def __post_init__(self) -> None:
        for ip in self.node_ips:
            try:
                IPAddress(ip)
            except (AddrFormatError, ValueError):
                raise ConfigError("--node-ip", f"{ip!r} is not an IP address") from None
        if self.node_id is not None and not self.node_id.strip():
            raise ConfigError("--node-id", "empty")

    def metadata(self, configured: Mapping[str, Any]) -> dict[str, Any]:
        """`configured` node metadata plus INSTANCE_IPS and NAME where it does not set them (the bootstrap wins)."""
        out = dict(configured)
        if self.node_ips:
            out.setdefault("INSTANCE_IPS", ",".join(self.node_ips))
        if self.pod_name:
            out.setdefault("NAME", self.pod_name)
        return out
