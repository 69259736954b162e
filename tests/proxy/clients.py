"""One client interface over HTTP/1.1 and HTTP/2 (h2c prior knowledge), so a traffic test's body runs for both.

    def test_x(http):                       # the `http` fixture (conftest.py): parametrised "h1" / "h2"
        client = http.client(port)          # one keep-alive connection
        status, headers, body = client.request("/p", method="POST", body=b"x", headers={"host": "svc"})
        http.get(port, "/p")                # one request on a fresh connection

For h2 a `host` header becomes `:authority`; response header names are lower-case in both.
"""

from __future__ import annotations

import http.client
import socket

import h2.config
import h2.connection
import h2.events


class H1Client:
    """One keep-alive HTTP/1.1 client connection to the proxy."""

    def __init__(self, port: int, timeout: float = 5.0, source: str | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                               source_address=(source, 0) if source else None)  # fmt: skip

    def request(self, path: str, method: str = "GET", body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        out = (resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        if resp.will_close:
            self.conn.close()
        return out

    def close(self) -> None:
        self.conn.close()


class H2Client:
    """One h2c (prior knowledge) client connection; each request is one stream, answered before the next."""

    def __init__(self, port: int, timeout: float = 5.0, source: str | None = None) -> None:
        self.port = port
        self.timeout = timeout
        self.source = (source, 0) if source else None  # the client's own address (a local pod's, on loopback)
        self.sock: socket.socket | None = None

    def _connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout,
                                             source_address=self.source)  # fmt: skip
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def request(self, path: str, method: str = "GET", body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        if self.sock is None:
            self._connect()
        assert self.sock is not None
        extra = dict(headers or {})
        authority = extra.pop("host", None) or extra.pop("Host", None) or f"127.0.0.1:{self.port}"
        fields = [(b":method", method.encode()), (b":path", path.encode()), (b":scheme", b"http"),
                  (b":authority", authority.encode())]
        fields += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        if body:
            fields.append((b"content-length", str(len(body)).encode()))
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, fields, end_stream=not body)
        self.sock.sendall(self.conn.data_to_send())
        status, resp_headers, data = 0, {}, bytearray()
        done = False
        todo = memoryview(body or b"")
        while not done:
            while todo:  # the body, as the proxy's windows allow
                n = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size, len(todo))
                if n <= 0:
                    break
                self.conn.send_data(sid, bytes(todo[:n]), end_stream=n == len(todo))
                todo = todo[n:]
                self.sock.sendall(self.conn.data_to_send())
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("proxy closed the connection")
            for event in self.conn.receive_data(chunk):
                if getattr(event, "stream_id", sid) != sid:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    for n, v in event.headers:
                        if n == b":status":
                            status = int(v)
                        else:
                            key = n.decode().lower()
                            resp_headers[key] = f"{resp_headers[key]}, {v.decode()}" if key in resp_headers \
                                else v.decode()
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.TrailersReceived):
                    for n, v in event.headers:
                        resp_headers[n.decode().lower()] = v.decode()
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
                    todo = todo[:0]  # answered early: the rest of the body is not wanted
            self.sock.sendall(self.conn.data_to_send())
        return status, resp_headers, bytes(data)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Protocol:
    """The `http` fixture's value: how a test makes clients of one protocol."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.client = H2Client if name == "h2" else H1Client

    def get(self, port: int, path: str, source: str | None = None, **kw) -> tuple[int, dict[str, str], bytes]:
        client = self.client(port, source=source)
        try:
            return client.request(path, **kw)
        finally:
            client.close()

    def __repr__(self) -> str:
        return self.name
