"""Where the node's workloads are read from: a workloads file, or the Kubernetes API's pods of this node.

`read()` returns the current WorkloadSet or raises SourceError; the stream manager keeps the last good set
(a failing API server never closes the streams of running pods). The API is asked only for this node's pods
(`fieldSelector=spec.nodeName=<node>`), with the service-account token, verifying the cluster CA.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Protocol

import yaml

from planemesh.agent.workloads.discovery import workloads_from_file_dict, workloads_from_pod_list
from planemesh.agent.workloads.model import WorkloadError, WorkloadSet
from planemesh.agent.workloads.settings import WorkloadSettings
from planemesh.model.planes import Plane

MAX_POD_LIST_BYTES = 64 << 20  # a node runs at most a few hundred pods: a bigger answer is not a pod list


class SourceError(Exception):
    """The workloads could not be read this time (logged; the last good set stays)."""


class WorkloadSource(Protocol):
    async def read(self) -> WorkloadSet: ...


class FileSource:
    def __init__(self, path: str, planes: tuple[Plane, ...]) -> None:
        self.path, self.planes = Path(path), planes

    async def read(self) -> WorkloadSet:
        try:
            raw = yaml.safe_load(self.path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SourceError(f"workloads file {self.path}: {exc}") from None
        try:
            return workloads_from_file_dict(raw, self.planes)
        except WorkloadError as exc:
            raise SourceError(f"workloads file {self.path}: {exc}") from None


class KubernetesPods:
    def __init__(self, settings: WorkloadSettings, planes: tuple[Plane, ...], timeout_s: float = 10.0) -> None:
        assert settings.kubernetes is not None and settings.node_name is not None
        self.kube, self.node, self.planes = settings.kubernetes, settings.node_name, planes
        self.excluded = settings.exclude_namespaces
        self.timeout_s = timeout_s
        self.skipped: list[str] = []  # malformed pods of the last list (admin status)

    def url(self) -> str:
        query = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={self.node}"})
        return f"{self.kube.api}/api/v1/pods?{query}"

    def _get(self) -> bytes:
        headers = {"Accept": "application/json"}
        try:
            token = Path(self.kube.token_file).read_text().strip() if self.kube.token_file else ""
        except OSError as exc:
            raise SourceError(f"token {self.kube.token_file}: {exc.strerror}") from None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        context = None
        if self.kube.api.startswith("https://"):
            try:
                context = ssl.create_default_context(cafile=self.kube.ca_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise SourceError(f"CA {self.kube.ca_file}: {exc}") from None
        request = urllib.request.Request(self.url(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as resp:
                body = resp.read(MAX_POD_LIST_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise SourceError(f"GET {self.url()}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, ssl.SSLError, http.client.HTTPException) as exc:
            raise SourceError(f"GET {self.url()}: {getattr(exc, 'reason', exc)}") from None
        if len(body) > MAX_POD_LIST_BYTES:
            raise SourceError(f"GET {self.url()}: answer over {MAX_POD_LIST_BYTES} bytes")
        return body

    async def read(self) -> WorkloadSet:
        body = await asyncio.to_thread(self._get)
        try:
            found, self.skipped = workloads_from_pod_list(json.loads(body), self.planes, self.node, self.excluded)
        except (ValueError, WorkloadError) as exc:
            raise SourceError(f"GET {self.url()}: not a PodList: {exc}") from None
        return found


def make_source(settings: WorkloadSettings, planes: tuple[Plane, ...]) -> WorkloadSource:
    if settings.source == "file":
        assert settings.file is not None
        return FileSource(settings.file, planes)
    return KubernetesPods(settings, planes)
