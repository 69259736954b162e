"""A small fake Kubernetes API server for tests, on loopback: the pods list, watch bodies (chunked, scripted per
watch request) and TokenRequest. Real HTTP/1.1; every request is recorded."""

from __future__ import annotations

import http.server
import json
import queue
import threading
import urllib.parse
from typing import Any


class FakeApi(http.server.BaseHTTPRequestHandler):
    """GET /api/v1/pods: the list (`state["list"]`); with watch=1, the next script of `state["watches"]`:
    ("event", dict), ("raw", bytes), ("wait", threading.Event), ("status", code), ("drop",) (close without
    ending the chunked body); a script ends the body cleanly unless it dropped. No script: HTTP 500."""

    protocol_version = "HTTP/1.1"
    state: dict[str, Any] = {}

    def do_POST(self) -> None:
        """TokenRequest: `state["mint"](path, body)` -> (status, answer); recorded in `state["posts"]`."""
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        self.state["posts"].append((self.path, body, self.headers.get("authorization")))
        status, answer = self.state["mint"](self.path, body)
        self._answer(status, json.dumps(answer).encode())

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        self.state["requests"].append((query, self.headers.get("authorization")))
        if "watch" not in query:
            return self._answer(200, json.dumps(self.state["list"]).encode())
        try:
            script = self.state["watches"].get_nowait()
        except queue.Empty:
            return self._answer(500, b'{"kind":"Status","code":500}')
        if script and script[0][0] == "status":
            return self._answer(script[0][1], b'{"kind":"Status"}')
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for step in script:
            if step[0] == "drop":
                self.wfile.flush()
                self.close_connection = True
                return
            if step[0] == "wait":
                step[1].wait(10)
                continue
            data = step[1] if step[0] == "raw" else json.dumps(step[1]).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def start_fake_api(pod_list: dict, mint: Any = None) -> tuple[http.server.ThreadingHTTPServer, dict[str, Any]]:
    """The server (serving in a daemon thread; `shutdown()` and `server_close()` it) and its state."""
    FakeApi.state = state = {"list": pod_list, "watches": queue.Queue(), "requests": [], "posts": [],
                             "mint": mint or (lambda path, body: (404, {"kind": "Status", "code": 404}))}  # fmt: skip
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state
