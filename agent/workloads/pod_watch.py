"""The node's pods as the API server describes them: one list, then watch events. Pure (no I/O).

    cache = PodCache(planes, "worker-1", excluded)
    cache.replace(pod_list)                   # GET /api/v1/pods?fieldSelector=spec.nodeName=worker-1
    step = cache.apply(json.loads(line))      # each line of ...&watch=1&resourceVersion=<cache.resource_version>
    if step is Step.RELIST: ...               # 410 Gone: the version is too old, list again
    cache.workloads()                         # the local workloads now

Kubernetes' list-then-watch protocol: the list's `metadata.resourceVersion` is where the watch starts; every
event carries its object's `resourceVersion`, which becomes the next starting point (a watch that ends or
breaks resumes from there without missing or repeating an event); `BOOKMARK` events move it forward without a
change (`allowWatchBookmarks=true`); an `ERROR` event with a Status of code 410 ("Expired"/"Gone") means the
version left the server's window: the client lists again. A malformed event names what is wrong
(WorkloadError); a malformed pod in an event is skipped and reported, as in a list.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from planemesh.agent.workloads.discovery import pod_workload
from planemesh.agent.workloads.model import Workload, WorkloadError, WorkloadSet
from planemesh.model.planes import Plane

GONE = 410


class Step(Enum):
    CHANGED = "changed"  # the workloads may differ: read workloads()
    UNCHANGED = "unchanged"  # a bookmark, or an event about a pod that is no workload before and after
    RELIST = "relist"  # 410 Gone: list again, then watch from the new list's version


def _meta(obj: Any, where: str) -> dict:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        raise WorkloadError(f"{where}.metadata", "expected an object")
    return meta


def _version(meta: dict, where: str) -> str:
    version = meta.get("resourceVersion")
    if not isinstance(version, str) or not version:
        raise WorkloadError(f"{where}.metadata.resourceVersion", f"expected a non-empty string, got {version!r}")
    return version


def _pod_key(meta: dict) -> str:
    return f"{meta.get('namespace', 'default')}/{meta.get('name')}"


class PodCache:
    """The pods of one node, kept from a list and the watch events that follow it."""

    def __init__(self, planes: tuple[Plane, ...], node: str | None, excluded: tuple[str, ...]) -> None:
        self.planes, self.node, self.excluded = planes, node, excluded
        self.resource_version = ""  # where the next watch starts ("" until a list)
        self._pods: dict[str, Workload | None] = {}  # namespace/name -> its workload (None: the pod is none)
        self._errors: dict[str, str] = {}  # namespace/name -> why the pod was skipped as malformed

    @property
    def skipped(self) -> list[str]:
        return sorted(self._errors.values())

    def workloads(self) -> WorkloadSet:
        return WorkloadSet({w.key: w for w in self._pods.values() if w is not None})

    def _parse(self, key: str, pod: Any, where: str) -> Workload | None:
        try:
            workload = pod_workload(pod, self.planes, self.node, self.excluded)
        except WorkloadError as exc:
            self._errors[key] = f"{where}.{exc}"
            return None
        self._errors.pop(key, None)
        return workload

    def replace(self, pod_list: Any) -> None:
        """A PodList replaces everything known. Raises WorkloadError (nothing changed) if it is none."""
        if not isinstance(pod_list, dict) or not isinstance(pod_list.get("items"), list):
            raise WorkloadError("PodList", "expected an object with an `items` list")
        version = _version(_meta(pod_list, "PodList"), "PodList")
        self._pods, self._errors = {}, {}
        for i, pod in enumerate(pod_list["items"]):
            meta = pod.get("metadata") if isinstance(pod, dict) else None
            key = _pod_key(meta) if isinstance(meta, dict) else f"#{i}"
            self._pods[key] = self._parse(key, pod, f"items[{i}]")
        self.resource_version = version

    def apply(self, event: Any) -> Step:
        """One watch event. Raises WorkloadError for an event that is not one (the caller resumes the watch)."""
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise WorkloadError("watch event", "expected an object with a `type`")
        kind, obj = event["type"], event.get("object")
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            if code == GONE:
                return Step.RELIST
            message = obj.get("message") if isinstance(obj, dict) else None
            raise WorkloadError("watch event ERROR", f"code {code!r}: {message or obj!r}")
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
            raise WorkloadError("watch event.type", f"{kind!r} is not ADDED, MODIFIED, DELETED, BOOKMARK or ERROR")
        meta = _meta(obj, f"{kind} event.object")
        version = _version(meta, f"{kind} event.object")
        if kind == "BOOKMARK":
            self.resource_version = version
            return Step.UNCHANGED
        key = _pod_key(meta)
        before = self._pods.get(key)
        if kind == "DELETED":
            self._pods.pop(key, None)
            self._errors.pop(key, None)
            after = None
        else:
            after = self._pods[key] = self._parse(key, obj, f"{kind} event.object")
        self.resource_version = version
        return Step.UNCHANGED if before is None and after is None else Step.CHANGED


__all__ = ["GONE", "PodCache", "Step"]
