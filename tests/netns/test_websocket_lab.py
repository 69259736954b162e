"""WebSocket through the real agent: a WebSocket echo server in the server pod on a declared HTTP port (8080:
the default xDS resources allow websocket there, as istiod does), a client in the client pod. The TC program
steers the connection to the plane's proxy, which routes the upgrade and turns it into a tunnel after the 101."""

from __future__ import annotations

import json
import os
import sys

import pytest

from planemesh.labs import netns as ns_tools
from planemesh.labs.netns import call_in
from planemesh.labs.ws_server import BINARY, TEXT, WebSocketClient
from tests.netns.agent_lab import eventually, running_agent

pytestmark = pytest.mark.netns
WS_PORT = 8080


def _echo_session(address: str) -> dict:
    """Runs in the client pod's namespace: handshake, messages both kinds, close handshake."""
    ws = WebSocketClient.connect(address, WS_PORT)
    try:
        status, _, _ = ws.handshake(f"[{address}]:{WS_PORT}" if ":" in address else f"{address}:{WS_PORT}", "/lab")
        ws.send("hello from the client pod")
        text = ws.recv()
        big = os.urandom(2 << 20)
        ws.send(big, fragment=65536)
        binary = ws.recv()
        code = ws.close(1000)
        return {"status": status, "text": text, "binary_ok": binary == (BINARY, big), "close": code, "end": ws.ended()}
    finally:
        ws.sock.close()


def test_websocket_echo_through_the_agent(run_prefix: str) -> None:
    with running_agent(f"{run_prefix}w") as env:
        server = ns_tools.start_until(
            env.lab.pod_ns("server"),
            [sys.executable, "-m", "planemesh.labs.ws_server", "--port", str(WS_PORT)],
            "ready",
        )
        try:
            for plane, version in (("oam", 4), ("media", 6)):
                result = call_in(env.client_ns, _echo_session, env.server(plane, version))
                assert result["status"] == 101, result
                assert result["text"] == (TEXT, b"hello from the client pod")
                assert result["binary_ok"] and result["close"] == (1000, b"") and result["end"], result
            handshakes = [json.loads(line) for line in server.output_lines if line.startswith("{")]  # type: ignore[attr-defined]
            assert len(handshakes) == 2
            # The proxy was on the way: it added x-request-id and the client's address in x-forwarded-for.
            request_ids = [h["headers"]["x-request-id"] for h in handshakes]
            assert [h["headers"]["x-forwarded-for"] for h in handshakes] == [
                env.client("oam", 4), env.client("media", 6)
            ]  # fmt: skip
            for request_id in request_ids:
                line = eventually(lambda rid=request_id: next(
                    (ln for ln in env.access_log().splitlines() if rid in ln), None))  # fmt: skip
                assert line and '"GET /lab HTTP/1.1" 101' in line, line
        finally:
            ns_tools.stop(server)
