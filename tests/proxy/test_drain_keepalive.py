"""Drain (hot upgrade, stop) never closes a keep-alive connection under a client that was promised it: a
response whose head went out before the drain began is followed by an idle period, and a request the client
sends then is answered (with `Connection: close`), not reset. Found by tests/netns/test_chaos.py."""

from __future__ import annotations

import http.client
import socket
import threading
import time

from tests.proxy.proxy_harness import ProxyThread
from tests.support.servers import AcceptLoop


class SlowBodyBackend:
    """Answers each request with a head at once and the rest of its body 0.4 s later, keep-alive."""

    def __init__(self) -> None:
        self.loop = AcceptLoop(socket.create_server(("127.0.0.1", 0)), self._serve)
        self.port = self.loop.port

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                _, buf = buf.split(b"\r\n\r\n", 1)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
                time.sleep(0.4)
                conn.sendall(b"world")


def test_drain_answers_the_request_sent_right_after_a_keep_alive_response() -> None:
    backend = SlowBodyBackend()
    px = ProxyThread([("127.0.0.1", backend.port)])
    px.drain_s = 3.0
    px.__enter__()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=5)
        conn.request("GET", "/first")
        resp = conn.getresponse()
        assert resp.getheader("connection") is None  # keep-alive promised
        drain = threading.Thread(target=px.__exit__, args=(None, None, None))  # drains, up to 3 s
        drain.start()
        time.sleep(0.05)
        assert resp.read() == b"helloworld"
        conn.request("GET", "/second")  # old code: the proxy had closed the connection, this one was reset
        second = conn.getresponse()
        assert (second.status, second.read(), second.getheader("connection")) == (200, b"helloworld", "close")
        conn.close()
        drain.join(10)
    finally:
        backend.loop.close()
