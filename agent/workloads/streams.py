"""One ADS stream per local workload, their configurations merged into the node's Snapshot.

    streams = WorkloadStreams(bootstrap, settings, agent.apply)
    await streams.run(make_source(settings, bootstrap.planes))   # forever: follow the workloads

Each workload gets an XdsClient of its own (xds/transport.py) with istio-agent's node id and metadata for that
pod (agent/workloads/model.py); a pod that appears opens a stream, a pod that goes away closes it and its
configuration leaves the node's snapshot. Updates of every stream within `apply_delay_s` are merged
(agent/workloads/merge.py) and applied to the node once; if that apply fails, every stream of the batch NACKs
and keeps its previous configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from planemesh.agent.workloads.merge import merge, scope
from planemesh.agent.workloads.model import Workload, WorkloadSet
from planemesh.agent.workloads.settings import WorkloadSettings
from planemesh.agent.workloads.sharing import SharedDecoder, SharedTranslations
from planemesh.agent.workloads.sources import SourceError, WorkloadSource, follow
from planemesh.agent.workloads.tokens import PodTokens
from planemesh.aio import stop_tasks
from planemesh.model.config import Snapshot
from planemesh.xds.bootstrap import Bootstrap
from planemesh.xds.transport import XdsClient

log = logging.getLogger("planemesh.workloads")
View = tuple[Workload, Snapshot]


def _complete(snap: Snapshot) -> bool:
    """Envoy's initial fetch: listeners and clusters received (agent.daemon.initial_fetch_done's rule)."""
    types = {part.split("=", 1)[0] for part in snap.version.removeprefix("xds:").split(",") if "=" in part}
    return {"LDS", "CDS"} <= types


def trust_domain(bootstrap: Bootstrap) -> str:
    """The trust domain of the workloads' SPIFFE IDs (their principals in the pod table): the bootstrap's
    `ca.trust_domain`, else istio's default `cluster.local`."""
    identity = bootstrap.identity
    return identity.trust_domain if identity is not None else "cluster.local"


class WorkloadStreams:
    def __init__(
        self, bootstrap: Bootstrap, settings: WorkloadSettings, apply: Callable[[Snapshot], Awaitable[None]]
    ) -> None:
        self.bootstrap, self.settings, self._apply = bootstrap, settings, apply
        self.workloads = WorkloadSet()
        self.clients: dict[str, tuple[Workload, XdsClient, asyncio.Task[None]]] = {}
        self.views: dict[str, View] = {}  # applied configurations, by workload key
        self.cache = SharedTranslations()
        self.decoder = SharedDecoder()
        self.snapshot: Snapshot | None = None
        self.last_error: str | None = None
        self.notes: tuple[str, ...] = ()
        self.applies = 0
        self.last_apply_s = 0.0  # merge + agent apply of the last batch
        self.streams_opened = self.streams_closed = 0
        self._batch: dict[str, View | None] | None = None  # key -> view before the batch (rollback)
        self._done: asyncio.Future[None] | None = None
        self._applying = False  # a batch is being merged and applied
        self._source: WorkloadSource | None = None
        # each pod's own istiod token (15012), when asked for: agent/workloads/tokens.py
        self.tokens = (
            PodTokens(settings.kubernetes, settings.istiod_tokens)
            if settings.istiod_tokens is not None and settings.kubernetes is not None
            else None
        )

    # ---- the workloads -----------------------------------------------------------------------------

    @property
    def _source_counts(self) -> dict[str, int] | None:
        source = self._source
        if source is None or not hasattr(source, "watches"):
            return None
        return {"lists": source.lists, "watches": source.watches}

    async def run(self, source: WorkloadSource) -> None:
        """Forever: follow the workloads (a watch, or a file read every poll_interval_s), open and close streams."""
        self._source = source
        try:
            async for item in follow(source, self.settings.poll_interval_s):
                if isinstance(item, SourceError):  # the source's failure never ends the streams
                    if str(item) != self.last_error:
                        log.warning("workloads not read (the %d streams stay): %s", len(self.clients), item)
                    self.last_error = str(item)
                    continue
                try:
                    await self.sync(item)
                except Exception:
                    log.exception("following the workloads failed")
        finally:
            await self.close()

    async def sync(self, new: WorkloadSet) -> None:
        started, stopped = self.workloads.diff(new)
        self.workloads = new
        for w in stopped:
            await self._stop(w.key)
        for w in started:
            self._start(w)
        # Removed workloads leave the node now, not with the next stream's update; a node without workloads is
        # configured (and ready) as soon as the source says so.
        if stopped or (self.snapshot is None and not new.workloads and self._batch is None):
            try:
                await self._flush(dict.fromkeys(w.key for w in stopped))
            except Exception as exc:
                log.error("removing %s from the node's configuration failed: %s", [w.key for w in stopped], exc)

    def _bootstrap(self, w: Workload) -> Bootstrap:
        s = self.settings
        meta = {**dict(self.bootstrap.node_metadata), **w.node_metadata(s.istio_version, s.cluster_id)}
        token = self.tokens.path(w) if self.tokens is not None else self.bootstrap.token_file
        return dataclasses.replace(
            self.bootstrap, node_id=w.node_id(s.dns_domain), node_metadata=tuple(meta.items()), token_file=token
        )

    async def _stream(self, w: Workload, client: XdsClient) -> None:
        if self.tokens is not None:  # its own token first: istiod refuses a stream presenting another identity's
            self.tokens.keep(w)
            await self.tokens.first(w)
        await client.run()

    def _start(self, w: Workload) -> None:
        async def apply(snap: Snapshot, key: str = w.key, workload: Workload = w) -> None:
            await self._update(key, (workload, snap))

        client = XdsClient(self._bootstrap(w), apply)
        client.translation_cache = self.cache  # identical resources translated once, shared by every stream
        client.state.decode_hook = self.decoder  # ... and decoded once
        planes = self.bootstrap.planes
        client.listener_scope = lambda lsn: scope(lsn, w, planes)  # its inbound and outbound never collide
        task = asyncio.get_running_loop().create_task(self._stream(w, client), name=f"xds-{w.key}")
        self.clients[w.key] = (w, client, task)
        self.streams_opened += 1
        log.info("workload %s (%s): stream opened as %s", w.key, ",".join(w.addresses), client.bootstrap.node_id)

    async def _stop(self, key: str) -> None:
        entry = self.clients.pop(key, None)
        if entry is None:
            return
        await stop_tasks(entry[2])
        if self.tokens is not None:
            await self.tokens.forget(entry[0])
        self.views.pop(key, None)
        self.streams_closed += 1
        log.info("workload %s: stream closed", key)

    async def close(self) -> None:
        for key in list(self.clients):
            await self._stop(key)

    # ---- configurations ------------------------------------------------------------------------------

    async def _update(self, key: str, view: View) -> None:
        """One stream's new configuration: applied with whatever else arrives in the window; raises the
        batch's ConfigError (this stream NACKs) when the node refuses it."""
        if key not in self.clients:
            return  # a stream closing while its update was in flight
        await self._flush({key: view})

    async def _flush(self, changes: dict[str, View | None]) -> None:
        if self._batch is None:
            self._batch, self._done = {}, asyncio.get_running_loop().create_future()
            if not self._applying:  # else the batch starts when the one being applied is done
                asyncio.get_running_loop().call_later(self.settings.apply_delay_s, self._start_apply)
        batch, done = self._batch, self._done
        assert done is not None
        for key, view in changes.items():
            batch.setdefault(key, self.views.get(key))
            if view is not None:
                self.views[key] = view
        await asyncio.shield(done)

    def _start_apply(self) -> None:
        batch, done = self._batch, self._done
        if batch is None or done is None:
            return
        self._batch = self._done = None
        self._applying = True
        asyncio.get_running_loop().create_task(self._apply_batch(batch, done))

    async def _apply_batch(self, batch: dict[str, View | None], done: asyncio.Future[None]) -> None:
        """One batch at a time: what arrives meanwhile waits in the next batch (one apply for all of it)."""
        try:
            await self._merge_and_apply(batch, done)
        finally:
            self._applying = False
            if self._batch is not None:
                asyncio.get_running_loop().call_later(self.settings.apply_delay_s, self._start_apply)

    async def _merge_and_apply(self, batch: dict[str, View | None], done: asyncio.Future[None]) -> None:
        start = time.perf_counter()
        try:
            live = {k: v for k, v in self.views.items() if k in self.clients}
            version = self._version(live)
            if self.snapshot is not None and self.snapshot.version == version:
                done.set_result(None)  # the very configurations the node runs (every stream's version equal)
                return
            merged = merge(self.bootstrap.planes, live, version, trust_domain(self.bootstrap))
            await self._apply(merged.snapshot)
        except Exception as exc:
            for key, old in batch.items():  # roll back: the previous configuration keeps serving
                if old is None:
                    self.views.pop(key, None)
                else:
                    self.views[key] = old
            self.last_error = str(exc)
            done.set_exception(exc)
            done.exception()  # retrieved: a batch nobody awaits any more logs nothing
            return
        self.snapshot, self.notes = merged.snapshot, merged.notes
        for note in merged.notes:
            log.info("%s", note)
        self.applies += 1
        self.last_apply_s = time.perf_counter() - start
        snap = merged.snapshot
        log.info(
            "applied %d workloads' configuration in %.1f ms: %d listeners, %d route configurations, %d clusters",
            len(live),
            self.last_apply_s * 1000,
            len(snap.listeners),
            len(snap.routes),
            len(snap.clusters),
        )
        self.last_error = None
        done.set_result(None)

    @staticmethod
    def _version(live: dict[str, View]) -> str:
        # what the merge reads of each workload: its configuration's version and its addresses
        parts = (f"{k}={v[1].version}@{','.join(v[0].addresses)}" for k, v in sorted(live.items()))
        digest = hashlib.sha256("|".join(parts).encode())
        # xds:LDS/CDS only when every stream had its initial fetch: readiness waits for all of them
        complete = all(_complete(v[1]) for v in live.values())
        prefix = "xds:LDS=w,CDS=w," if complete else "xds:"
        return f"{prefix}workloads={len(live)}:{digest.hexdigest()[:12]}"

    # ---- status (admin) --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "workloads": len(self.workloads.workloads),
            "streams": len(self.clients),
            "streams_opened": self.streams_opened,
            "streams_closed": self.streams_closed,
            "snapshot_version": self.snapshot.version if self.snapshot else None,
            "applies": self.applies,
            "last_apply_ms": round(self.last_apply_s * 1000, 2),
            "translations_shared": self.cache.hits,
            "translations": self.cache.misses,
            "decodes_shared": self.decoder.hits,
            "decodes": self.decoder.misses,
            "notes": list(self.notes),
            "last_error": self.last_error,
            "pod_requests": dict(self._source_counts) if self._source_counts else None,  # list/watch (kubernetes)
            "istiod_tokens": {"minted": self.tokens.minted, "failures": self.tokens.failures} if self.tokens else None,
            "per_workload": {
                key: {
                    "node_id": client.bootstrap.node_id,
                    "connected": client.state.connected,
                    "version": client.snapshot.version if client.snapshot else None,
                    "last_error": client.last_error,
                }
                for key, (_w, client, _t) in sorted(self.clients.items())
            },
        }

    def stats_report(self) -> dict[str, Any]:
        """The admin/metrics provider: per type URL, summed over the streams (one series per type)."""
        rows: dict[str, dict[str, Any]] = {}
        for _w, client, _t in self.clients.values():
            for row in client.stats_report()["xds"]:
                total = rows.setdefault(row["type_url"], {**row, "acks": 0, "nacks": 0, "resources": 0})
                for field in ("acks", "nacks", "resources"):
                    total[field] += row[field]
                if total["version"] != row["version"]:
                    total["version"] = "mixed"
        connected = all(c.state.connected for _w, c, _t in self.clients.values())
        return {"xds": list(rows.values()), "xds_connected": connected}
