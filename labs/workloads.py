"""A lab's pods as the agent's workloads file (agent/workloads/discovery.py): every plane address of each pod,
as the NPWG network-status annotation would list them in a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from planemesh.labs.lab import Lab


def workloads_file_dict(lab: Lab, pods: list[str], namespace: str = "default") -> dict[str, Any]:
    items = []
    for pod in pods:
        spec = lab.spec.pod(pod)
        addresses = [a for plane in spec.planes for v in (4, 6) if (a := lab.pod_addr(pod, plane, v)) is not None]
        items.append({"name": pod, "namespace": namespace, "addresses": addresses, "labels": {"app": pod},
                      "service_account": pod})  # fmt: skip
    return {"workloads": items}


def write_workloads_file(path: Path, lab: Lab, pods: list[str]) -> None:
    """Written whole, then renamed: the agent polling the file never reads half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(workloads_file_dict(lab, pods)))
    tmp.replace(path)
