"""Writes the seed corpus (tests/fuzz/corpus/<target>/): `python -m tests.fuzz.seeds`. Inputs made by real
clients (h2's client connection, the ssl module's ClientHello), so the fuzzer starts from valid traffic.
The first byte of http1/h2 inputs steers the harness (targets._pieces, targets._drive)."""

from __future__ import annotations

import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.settings

CORPUS = Path(__file__).parent / "corpus"
H = b"Host: a.example\r\n"
HTTP1 = {
    "get": b"GET / HTTP/1.1\r\n" + H + b"\r\n",
    "chunked-trailers": b"POST /q?id=ab HTTP/1.1\r\n" + H
    + b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
    "pipelined": b"GET /r/aa1 HTTP/1.1\r\n" + H + b"\r\nPOST /h HTTP/1.1\r\n" + H
    + b"x-v: v2\r\nContent-Length: 3\r\n\r\nabcGET /old HTTP/1.1\r\n" + H + b"\r\n",
    "connect": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n\x16\x03\x01",
    "upgrade": b"GET /ws HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00",
    "h2c-upgrade": b"GET / HTTP/1.1\r\n" + H
    + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
    + b"Content-Length: 2\r\n\r\nhi",
    "http10-absolute": b"GET http://b.example/x?y#f HTTP/1.0\r\n\r\n",
    "expect": b"PUT /x HTTP/1.1\r\n" + H
    + b"Expect: 100-continue\r\nContent-Length: 4\r\nConnection: x-a, keep-alive\r\nx-a: 1\r\n\r\nbody",
    "cl-and-te": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}
HDRS = [(":method", "GET"), (":path", "/h"), (":scheme", "http"), (":authority", "a"), ("x-v", "v1")]


def _client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


def _frames(conn: h2.connection.H2Connection) -> bytes:
    return conn.data_to_send()[24:]  # the harness sends the preface itself


def h2_seeds() -> dict[str, bytes]:
    out = {}
    c = _client()
    c.send_headers(1, HDRS, end_stream=True)
    out["get"] = b"\x80" + _frames(c)
    c = _client()
    c.send_headers(1, [(":method", "POST"), (":path", "/q?id=ab"), (":scheme", "http"), (":authority", "a")])
    c.send_data(1, b"x" * 100)
    c.end_stream(1)
    c.ping(b"12345678")
    c.increment_flow_control_window(1000)
    c.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 5})
    out["post-ping-settings"] = b"\xc3" + _frames(c)
    c = _client()
    c.send_headers(1, HDRS)
    c.reset_stream(1)
    c.send_headers(3, HDRS, end_stream=True, priority_weight=10, priority_depends_on=1)
    out["reset-priority"] = b"\x85" + _frames(c)
    return out


def h2client_seeds() -> dict[str, bytes]:
    """What an h2c server (the h2 library) answers the harness's three streams."""
    out = {}
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    client = _client()
    for sid in (1, 3, 5):
        client.send_headers(sid, HDRS, end_stream=sid == 1)
    server.receive_data(client.data_to_send())
    server.data_to_send()
    server.send_headers(1, [(b":status", b"100")])
    server.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.send_data(1, b"\x00\x00\x00\x00\x02hi")
    server.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    server.reset_stream(3)
    server.increment_flow_control_window(1000, 5)
    server.ping(b"12345678")
    server.close_connection(last_stream_id=5)
    out["responses-reset-goaway"] = server.data_to_send()
    return out


def client_hello(server_name: str | None, alpn: list[str] | None) -> bytes:
    """The first TLS record a real client (the ssl module) sends."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def seeds() -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {
        "http1": {}, "h2": h2_seeds(), "h2client": h2client_seeds(), "sniff": {}, "sni": {}, "xds": {},
    }  # fmt: skip
    for name, req in HTTP1.items():
        out["http1"][name + "-oneread"] = b"\x80" + req
        out["http1"][name + "-held-split"] = b"\x47" + req
    for name, server_name, alpn in (("sni-alpn", "api.example.com", ["h2", "http/1.1"]),
                                    ("wildcard", "x.y.example.com", None), ("no-sni", None, ["http/1.1"])):  # fmt: skip
        record = client_hello(server_name, alpn)
        out["sniff"]["tls-" + name] = record
        out["sni"][name] = record[5:]  # the handshake message after the record header
    out["sniff"].update({"h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http1": HTTP1["get"],
                         "partial-method": b"PROPFI", "opaque": b"\x00\x01binary"})  # fmt: skip
    # xds inputs steer the mutator (FuzzedDataProvider): any bytes do; a few lengths to start from.
    out["xds"] = {f"steer-{n}": bytes((i * 37 + n) % 256 for i in range(n)) for n in (16, 64, 256)}
    return out


def main() -> None:
    for target, inputs in seeds().items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in inputs.items():
            (folder / name).write_bytes(data)


if __name__ == "__main__":
    main()
