"""The pods source's list-then-watch against a small fake API server on loopback (real HTTP/1.1, chunked watch
bodies): events change the workloads as they come, a watch resumes from the last resourceVersion (bookmarks
included) without listing again, 410 Gone (an ERROR event or the HTTP status) lists again, and a failed or
broken watch is reported and retried. PodCache, the pure part, on its own first."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from planemesh.agent.workloads.model import WorkloadError
from planemesh.agent.workloads.pod_watch import PodCache, Step
from planemesh.agent.workloads.settings import settings_from_dict
from planemesh.agent.workloads.sources import KubernetesPods, SourceError
from planemesh.model.static_config import load_default_config
from tests.support.kube_api import start_fake_api

PLANES = load_default_config().planes


def pod(name: str, ip: str, version: str, phase: str = "Running") -> dict:
    return {"metadata": {"name": name, "namespace": "default", "resourceVersion": version},
            "spec": {"nodeName": "n1"}, "status": {"phase": phase, "podIP": ip}}  # fmt: skip


def pod_list(version: str, *pods: dict) -> dict:
    return {"kind": "PodList", "metadata": {"resourceVersion": version}, "items": list(pods)}


def event(kind: str, obj: dict) -> dict:
    return {"type": kind, "object": obj}


def bookmark(version: str) -> dict:
    return event("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": version}})


GONE_EVENT = event("ERROR", {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410,
                             "message": "too old resource version: 5 (20)"})  # fmt: skip


# ---- PodCache (pure) ---------------------------------------------------------------------------------------


def test_cache_follows_list_and_events() -> None:
    cache = PodCache(PLANES, "n1", ())
    cache.replace(pod_list("10", pod("a", "198.18.1.10", "9")))
    assert list(cache.workloads().workloads) == ["a.default"] and cache.resource_version == "10"
    assert cache.apply(event("ADDED", pod("b", "198.18.1.11", "11"))) is Step.CHANGED
    assert sorted(cache.workloads().workloads) == ["a.default", "b.default"] and cache.resource_version == "11"
    assert cache.apply(event("MODIFIED", pod("b", "198.18.1.11", "12", phase="Succeeded"))) is Step.CHANGED
    assert list(cache.workloads().workloads) == ["a.default"]
    assert cache.apply(event("MODIFIED", pod("b", "198.18.1.11", "13", phase="Failed"))) is Step.UNCHANGED
    assert cache.apply(bookmark("20")) is Step.UNCHANGED and cache.resource_version == "20"
    assert cache.apply(event("DELETED", pod("a", "198.18.1.10", "21"))) is Step.CHANGED
    assert not cache.workloads().workloads and cache.resource_version == "21"
    assert cache.apply(GONE_EVENT) is Step.RELIST and cache.resource_version == "21"


def test_cache_reports_malformed_pods_and_refuses_malformed_events() -> None:
    cache = PodCache(PLANES, "n1", ())
    cache.replace(pod_list("1", {"metadata": {"name": "B!", "namespace": "default"}}, pod("a", "198.18.1.10", "1")))
    assert list(cache.workloads().workloads) == ["a.default"] and len(cache.skipped) == 1
    cache.apply(event("MODIFIED", pod("B!", "198.18.1.12", "2") | {"metadata": {"name": "B!", "resourceVersion": "2"}}))
    assert len(cache.skipped) == 1  # still malformed, reported once
    for bad, why in [
        ("text", "watch event"),
        ({"type": "ADDED"}, "ADDED event.object.metadata"),
        (event("ADDED", {"metadata": {"name": "c"}}), "resourceVersion"),
        (event("RENAMED", pod("c", "198.18.1.13", "3")), "RENAMED"),
        (event("ERROR", {"kind": "Status", "code": 500, "message": "etcd down"}), "etcd down"),
    ]:
        with pytest.raises(WorkloadError, match=why):
            cache.apply(bad)
    with pytest.raises(WorkloadError, match="PodList"):
        cache.replace({"kind": "Status"})
    assert list(cache.workloads().workloads) == ["a.default"] and cache.resource_version == "2"


# ---- against a fake API server (tests/support/kube_api.py) ----------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[KubernetesPods, dict[str, Any]]]:
    server, state = start_fake_api(pod_list("10"))
    token = tmp_path / "token"
    token.write_text("jwt-of-the-agent\n")
    raw = {"source": "kubernetes", "node_name": "n1",
           "kubernetes": {"api": f"http://127.0.0.1:{server.server_port}", "token_file": str(token)}}  # fmt: skip
    try:
        yield KubernetesPods(settings_from_dict(raw, {}), PLANES, timeout_s=5, watch_timeout_s=5), state
    finally:
        server.shutdown()
        server.server_close()


def _follow(source: KubernetesPods, n: int, retry_s: float = 0.05) -> list[Any]:
    """The first `n` items `follow` yields (workload keys, or the SourceError's text)."""

    async def take() -> list[Any]:
        out: list[Any] = []
        gen = source.follow(retry_s)
        try:
            while len(out) < n:
                item = await asyncio.wait_for(anext(gen), 10)
                out.append(str(item) if isinstance(item, SourceError) else sorted(item.workloads))
        finally:
            await gen.aclose()
        return out

    return asyncio.run(take())


def _watch_versions(state: dict[str, Any]) -> list[str]:
    return [q["resourceVersion"][0] for q, _ in state["requests"] if "watch" in q]


def _lists(state: dict[str, Any]) -> int:
    return sum("watch" not in q for q, _ in state["requests"])


def test_list_then_watch_events_change_the_workloads(api) -> None:
    source, state = api
    state["list"] = pod_list("10", pod("a", "198.18.1.10", "9"))
    state["watches"].put([("event", event("ADDED", pod("b", "198.18.1.11", "11"))),
                          ("event", event("MODIFIED", pod("a", "198.18.1.10", "12", phase="Succeeded"))),
                          ("event", event("DELETED", pod("b", "198.18.1.11", "13")))])  # fmt: skip
    assert _follow(source, 4) == [["a.default"], ["a.default", "b.default"], ["b.default"], []]
    query, auth = state["requests"][1]
    assert query == {"fieldSelector": ["spec.nodeName=n1"], "watch": ["1"], "resourceVersion": ["10"],
                     "allowWatchBookmarks": ["true"], "timeoutSeconds": ["5"]}  # fmt: skip
    assert auth == "Bearer jwt-of-the-agent" and state["requests"][0][1] == auth


def test_a_watch_that_ends_resumes_from_the_last_version_without_listing(api) -> None:
    source, state = api
    state["watches"].put([("event", bookmark("15"))])  # the server's timeoutSeconds: the body just ends
    state["watches"].put([("event", event("ADDED", pod("a", "198.18.1.10", "16"))), ("event", bookmark("30"))])
    state["watches"].put([("event", event("ADDED", pod("b", "198.18.1.11", "31")))])
    assert _follow(source, 3) == [[], ["a.default"], ["a.default", "b.default"]]
    assert _watch_versions(state) == ["10", "15", "30"] and _lists(state) == 1


@pytest.mark.parametrize("gone", [[("event", GONE_EVENT)], [("status", 410)]], ids=["ERROR event", "HTTP 410"])
def test_gone_lists_again(api, gone) -> None:
    source, state = api
    state["list"] = pod_list("10", pod("a", "198.18.1.10", "9"))
    state["watches"].put(gone)

    state["watches"].put([("event", event("ADDED", pod("d", "198.18.1.14", "41")))])
    items = []

    async def take() -> None:
        gen = source.follow(0.05)
        try:
            items.append(sorted((await asyncio.wait_for(anext(gen), 10)).workloads))
            state["list"] = pod_list("40", pod("c", "198.18.1.13", "39"))  # before the watch reports Gone
            while len(items) < 3:
                item = await asyncio.wait_for(anext(gen), 10)
                items.append(str(item) if isinstance(item, SourceError) else sorted(item.workloads))
        finally:
            await gen.aclose()

    asyncio.run(take())
    assert items == [["a.default"], ["c.default"], ["c.default", "d.default"]]
    assert _lists(state) == 2 and _watch_versions(state) == ["10", "40"]


def test_a_failed_or_broken_watch_is_reported_and_resumed(api) -> None:
    source, state = api
    state["watches"].put([("status", 500)])
    broken = [("event", event("ADDED", pod("a", "198.18.1.10", "11"))), ("raw", b'{"type": "ADD'), ("drop",)]
    state["watches"].put(broken)  # half an event, then the connection is gone
    state["watches"].put([("raw", b"not json\n")])
    state["watches"].put([("event", event("ADDED", pod("b", "198.18.1.11", "12")))])
    got = _follow(source, 6)
    assert got[0] == [] and "HTTP 500" in got[1] and got[2] == ["a.default"]
    assert "connection closed" in got[3] and "watch" in got[4] and got[5] == ["a.default", "b.default"]
    assert _watch_versions(state) == ["10", "10", "11", "11"] and _lists(state) == 1


def test_an_unreachable_api_is_reported_and_retried(api, tmp_path: Path) -> None:
    source, state = api
    source.kube = type(source.kube)(api="http://127.0.0.1:9", token_file=source.kube.token_file)  # nothing listens
    got = _follow(source, 2)
    assert all("127.0.0.1:9" in g for g in got) and not state["requests"]


def test_a_silent_watch_counts_as_broken(api) -> None:
    source, state = api
    source.watch_idle_s = 0.5
    quiet = threading.Event()
    state["watches"].put([("wait", quiet)])  # headers, then nothing
    state["watches"].put([("event", event("ADDED", pod("a", "198.18.1.10", "11")))])
    try:
        got = _follow(source, 3)
    finally:
        quiet.set()
    assert got[0] == [] and "no data for 0.5 s" in got[1] and got[2] == ["a.default"]
