"""Where the node's workloads are read from: a workloads file, or the Kubernetes API's pods of this node.

`follow(source, every_s)` yields the WorkloadSet each time it may have changed, or a SourceError when it could
not be read (the stream manager keeps the last good set: a failing API server never closes the streams of
running pods). A file is read every `every_s`. The API is asked only for this node's pods
(`fieldSelector=spec.nodeName=<node>`), with the service-account token, verifying the cluster CA: one list,
then a watch from the list's resourceVersion (agent/workloads/pod_watch.py: bookmarks, resumed from the last
version when it ends or breaks, listed again on 410 Gone); a failure is retried every `every_s`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import yaml

from planemesh.agent.workloads.discovery import workloads_from_file_dict, workloads_from_pod_list
from planemesh.agent.workloads.kube_http import KubeHttpError, stream_lines
from planemesh.agent.workloads.model import WorkloadError, WorkloadSet
from planemesh.agent.workloads.pod_watch import GONE, PodCache, Step
from planemesh.agent.workloads.settings import KubernetesSource, WorkloadSettings
from planemesh.model.planes import Plane

MAX_POD_LIST_BYTES = 64 << 20  # a node runs at most a few hundred pods: a bigger answer is not a pod list
WATCH_TIMEOUT_S = 300  # the API server ends each watch after this (timeoutSeconds); resumed at once
log = logging.getLogger("planemesh.workloads")


class SourceError(Exception):
    """The workloads could not be read this time (logged; the last good set stays)."""


class WorkloadSource(Protocol):
    async def read(self) -> WorkloadSet: ...


async def follow(source: WorkloadSource, every_s: float) -> AsyncIterator[WorkloadSet | SourceError]:
    """The source's workloads as they change: its own `follow` (a watch) if it has one, else read every
    `every_s`. Errors are yielded, never raised (a bug in a source is logged and yielded as a SourceError)."""
    watcher = getattr(source, "follow", None)
    if watcher is not None:
        async for item in watcher(every_s):
            yield item
        return
    while True:
        try:
            yield await source.read()
        except SourceError as exc:
            yield exc
        except Exception as exc:
            log.exception("workloads source failed")
            yield SourceError(f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(every_s)


def kube_auth(kube: KubernetesSource, error: type[Exception]) -> tuple[dict[str, str], ssl.SSLContext | None]:
    """Headers (the agent's token, read each time: kubelet rotates projected tokens) and the TLS context for the
    API server; `error` (naming the file) when the token or CA cannot be read."""
    headers = {}
    try:
        token = Path(kube.token_file).read_text().strip() if kube.token_file else ""
    except OSError as exc:
        raise error(f"token {kube.token_file}: {exc.strerror}") from None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    context = None
    if kube.api.startswith("https://"):
        try:
            context = ssl.create_default_context(cafile=kube.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise error(f"CA {kube.ca_file}: {exc}") from None
    return headers, context


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
    def __init__(
        self,
        settings: WorkloadSettings,
        planes: tuple[Plane, ...],
        timeout_s: float = 10.0,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
        watch_idle_s: float | None = None,
    ) -> None:
        assert settings.kubernetes is not None and settings.node_name is not None
        self.kube, self.node, self.planes = settings.kubernetes, settings.node_name, planes
        self.excluded = settings.exclude_namespaces
        self.timeout_s, self.watch_timeout_s = timeout_s, watch_timeout_s
        # silence longer than this is a broken watch (the server's bookmarks and timeoutSeconds keep one talking)
        self.watch_idle_s = watch_idle_s if watch_idle_s is not None else watch_timeout_s + 30
        self.skipped: list[str] = []  # malformed pods of the last list (admin status)
        self.lists = self.watches = 0  # requests made (admin status, tests)

    def url(self, **extra: str) -> str:
        query = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={self.node}", **extra})
        return f"{self.kube.api}/api/v1/pods?{query}"

    def _auth(self) -> tuple[dict[str, str], ssl.SSLContext | None]:
        return kube_auth(self.kube, SourceError)

    def _get(self) -> bytes:
        headers, context = self._auth()
        headers["Accept"] = "application/json"
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

    async def _list(self, cache: PodCache) -> None:
        self.lists += 1
        body = await asyncio.to_thread(self._get)
        try:
            cache.replace(json.loads(body))
        except (ValueError, WorkloadError) as exc:
            raise SourceError(f"GET {self.url()}: not a PodList: {exc}") from None
        self.skipped = cache.skipped

    async def _watch(self, cache: PodCache) -> AsyncIterator[Step]:
        """One watch from the cache's version: a Step per event that changed something, RELIST on 410 Gone;
        returns when the server ends the watch. SourceError when it fails (the cache keeps its version)."""
        self.watches += 1
        url = self.url(watch="1", resourceVersion=cache.resource_version, allowWatchBookmarks="true",
                       timeoutSeconds=str(self.watch_timeout_s))  # fmt: skip
        headers, context = self._auth()
        try:
            async for line in stream_lines(url, headers, context, self.watch_idle_s):
                try:
                    step = cache.apply(json.loads(line))
                except (ValueError, WorkloadError) as exc:  # the stream may be out of step: resume from the version
                    raise SourceError(f"watch {url}: {exc}") from None
                if step is not Step.UNCHANGED:
                    self.skipped = cache.skipped
                    yield step
                if step is Step.RELIST:
                    return
        except KubeHttpError as exc:
            if exc.status == GONE:
                yield Step.RELIST
                return
            raise SourceError(f"watch {url}: {exc}") from None

    async def follow(self, retry_s: float) -> AsyncIterator[WorkloadSet | SourceError]:
        """Forever: the workloads after the list and after each change the watch reports; a SourceError when a
        request fails (then again after `retry_s`: the watch from the last version, or a new list)."""
        cache = PodCache(self.planes, self.node, self.excluded)
        listed = False
        while True:
            try:
                if not listed:
                    await self._list(cache)
                    listed = True
                    yield cache.workloads()
                async for step in self._watch(cache):
                    if step is Step.RELIST:
                        log.info("pod watch: resourceVersion %s expired (410 Gone): listing again",
                                 cache.resource_version)  # fmt: skip
                        listed = False
                        break
                    yield cache.workloads()
                continue  # the server ended the watch (timeoutSeconds): resume from the version at once
            except SourceError as exc:
                yield exc
            except Exception as exc:  # a bug must not end the workloads' streams: reported, retried
                log.exception("pod watch failed")
                yield SourceError(f"pod watch: {type(exc).__name__}: {exc}")
            await asyncio.sleep(retry_s)


def make_source(settings: WorkloadSettings, planes: tuple[Plane, ...]) -> WorkloadSource:
    if settings.source == "file":
        assert settings.file is not None
        return FileSource(settings.file, planes)
    return KubernetesPods(settings, planes)
