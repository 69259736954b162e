"""One decoder and one translation cache for every workload stream: identical resources become the very same
objects.

istiod sends most resources identically to every pod of a namespace (clusters, endpoints, route
configurations). Keyed by content (the serialized messages), the first stream that receives a resource
translates it and every other stream gets that object back: translation runs once per distinct resource,
the per-workload snapshots share their objects, and the merge (agent/workloads/merge.py) recognizes them by
identity. The client's own `retain` (which only knows its own stream's names) is a no-op here; instead each
name keeps at most MAX_VARIANTS contents, the most recently used.

`SharedDecoder` does the same one step earlier: a resource whose bytes another stream already received is not
decoded again and the streams hold one message (about 70 KB per stream for an istiod sidecar push).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from planemesh.model.config import Cluster, RouteConfig
from planemesh.model.planes import Plane
from planemesh.xds.client_state import eds_name
from planemesh.xds.resources import Wrapped
from planemesh.xds.translate import TranslationCache
from planemesh.xds.translate_clusters import translate_cluster
from planemesh.xds.translate_routes import translate_route_config

MAX_VARIANTS = 8  # contents kept per resource name (workloads given different versions of one resource)


def _content(msg: Any) -> bytes:
    return b"" if msg is None else msg.SerializeToString(deterministic=True)


class SharedDecoder:
    """AdsClientState.decode_hook shared by the streams: (type URL, raw bytes) -> one decoded resource. Failures
    are not kept (a bad resource is decoded, and refused, again)."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, bytes], Wrapped] = {}
        self._keys: dict[tuple[str, str], OrderedDict[tuple[str, bytes], None]] = {}  # (type, name) -> its keys
        self.hits = self.misses = 0

    def __call__(self, type_url: str, raw: Any, decode: Callable[[Any, str], Wrapped]) -> Wrapped:
        key = (type_url, raw.SerializeToString())
        hit = self._items.get(key)
        if hit is not None:
            self.hits += 1
            self._keys[type_url, hit.name].move_to_end(key)
            return hit
        self.misses += 1
        item = decode(raw, type_url)
        self._items[key] = item
        keys = self._keys.setdefault((type_url, item.name), OrderedDict())
        keys[key] = None
        while len(keys) > MAX_VARIANTS:
            self._items.pop(keys.popitem(last=False)[0], None)
        return item

    def entries(self) -> int:
        return len(self._items)


class SharedTranslations(TranslationCache):
    def __init__(self) -> None:
        super().__init__()
        self._by_content: dict[str, OrderedDict[tuple, Any]] = {}

    def _lookup(self, kind: str, name: str, key: tuple) -> Any:
        variants = self._by_content.get(f"{kind}:{name}")
        if variants is None or key not in variants:
            return None
        variants.move_to_end(key)
        self.hits += 1
        return variants[key]

    def _store(self, kind: str, name: str, key: tuple, value: Any) -> Any:
        variants = self._by_content.setdefault(f"{kind}:{name}", OrderedDict())
        variants[key] = value
        while len(variants) > MAX_VARIANTS:
            variants.popitem(last=False)
        return value

    def cluster(self, name: str, cluster, endpoints, planes: tuple[Plane, ...], path: str) -> Cluster:
        service = eds_name(cluster)
        cla = endpoints.get(service) if service is not None else None
        key = (_content(cluster), _content(cla), planes)
        hit = self._lookup("cluster", name, key)
        if hit is not None:
            return hit
        self.misses += 1
        return self._store("cluster", name, key, translate_cluster(cluster, endpoints, planes, path))

    def route(self, name: str, rc, path: str) -> RouteConfig:
        key = (_content(rc),)
        hit = self._lookup("route", name, key)
        if hit is not None:
            return hit
        self.misses += 1
        return self._store("route", name, key, translate_route_config(rc, path))

    def retain(self, clusters, routes) -> None:  # shared by every stream: bounded per name instead
        return

    def entries(self) -> int:
        return sum(len(v) for v in self._by_content.values())
