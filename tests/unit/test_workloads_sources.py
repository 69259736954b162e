"""The Kubernetes pods source against a real HTTP server on loopback: it asks for this node's pods only, with the
service-account token, and a refusal or a body that is no PodList is a SourceError naming the request (the
stream manager then keeps its streams)."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from planemesh.agent.workloads.settings import settings_from_dict
from planemesh.agent.workloads.sources import FileSource, KubernetesPods, SourceError
from planemesh.model.static_config import load_default_config

PLANES = load_default_config().planes
POD = {"metadata": {"name": "a", "namespace": "default"}, "spec": {"nodeName": "n1"},
       "status": {"phase": "Running", "podIP": "198.18.1.10"}}  # fmt: skip


class _Api(http.server.BaseHTTPRequestHandler):
    answer: tuple[int, bytes] = (200, b"")
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:
        type(self).seen.append((self.path, self.headers.get("authorization")))
        status, body = self.answer
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[KubernetesPods, type[_Api]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = tmp_path / "token"
    token.write_text("jwt-of-the-agent\n")
    raw = {"source": "kubernetes", "node_name": "n1",
           "kubernetes": {"api": f"http://127.0.0.1:{server.server_port}", "token_file": str(token)}}  # fmt: skip
    _Api.seen = []
    try:
        yield KubernetesPods(settings_from_dict(raw, {}), PLANES, timeout_s=5), _Api
    finally:
        server.shutdown()
        server.server_close()


def test_lists_this_nodes_pods_with_the_token(api) -> None:
    source, handler = api
    handler.answer = (200, json.dumps({"kind": "PodList", "items": [POD, {"metadata": {"name": "B!"}}]}).encode())
    found = asyncio.run(source.read())
    assert list(found.workloads) == ["a.default"] and len(source.skipped) == 1
    assert handler.seen == [("/api/v1/pods?fieldSelector=spec.nodeName%3Dn1", "Bearer jwt-of-the-agent")]


@pytest.mark.parametrize(
    ("answer", "why"),
    [((403, b'{"kind":"Status"}'), "HTTP 403"), ((200, b"<html>"), "not a PodList"),
     ((200, b'{"kind":"Status"}'), "not a PodList")],
)  # fmt: skip
def test_refusals_and_garbage_are_source_errors(api, answer, why) -> None:
    source, handler = api
    handler.answer = answer
    with pytest.raises(SourceError, match=why):
        asyncio.run(source.read())


def test_file_source_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    with pytest.raises(SourceError, match=r"w\.yaml"):
        asyncio.run(FileSource(str(path), PLANES).read())
    path.write_text("workloads: [{name: a, addresses: [nope]}]")
    with pytest.raises(SourceError, match=r"workloads\[0\]\.addresses\[0\]"):
        asyncio.run(FileSource(str(path), PLANES).read())
