"""messages.py: the codec-neutral request head and its two encodings (HTTP/1.1 bytes, h2 fields), and the
neutral response head the HTTP/1.1 upstream codec delivers (hop-by-hop fields, framing and Connection-named
fields are the codec's, never the relay's)."""

from __future__ import annotations

from types import SimpleNamespace

from planemesh.agent.proxy.messages import RequestHead, h1_request_bytes, h2_request_fields
from planemesh.agent.proxy.upstream import UpstreamConnection


def _head(target: bytes = b"/a?b=1", fields=None, **kw) -> RequestHead:
    fields = [(b"host", b"svc:8080"), (b"x-a", b"1"), (b"x-request-id", b"r1")] if fields is None else fields
    return RequestHead(b"POST", target, fields, **kw)


def test_h1_encoding_frames_the_body_and_the_upgrade() -> None:
    assert h1_request_bytes(_head(length=5)) == (
        b"POST /a?b=1 HTTP/1.1\r\nhost: svc:8080\r\nx-a: 1\r\nx-request-id: r1\r\ncontent-length: 5\r\n\r\n"
    )
    assert h1_request_bytes(_head(chunked=True)).endswith(b"x-request-id: r1\r\ntransfer-encoding: chunked\r\n\r\n")
    upgrade = h1_request_bytes(_head(fields=[(b"host", b"h")], upgrade=b"websocket"))
    assert upgrade == b"POST /a?b=1 HTTP/1.1\r\nhost: h\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"


def test_h2_fields_pseudo_headers_first_host_as_authority() -> None:
    fields = h2_request_fields(_head(length=5), "10.0.0.1:80", te_trailers=False)
    assert fields == [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc:8080"), (b":path", b"/a?b=1"),
        (b"x-a", b"1"), (b"x-request-id", b"r1"), (b"content-length", b"5"),
    ]


def test_h2_fields_drop_hop_by_hop_and_keep_te_trailers_when_asked() -> None:
    head = _head(fields=[(b"host", b"h"), (b"connection", b"x"), (b"keep-alive", b"1"), (b"te", b"trailers"),
                         (b"transfer-encoding", b"chunked"), (b"x-b", b"2")], chunked=True)
    assert h2_request_fields(head, None, te_trailers=False)[4:] == [(b"x-b", b"2")]
    assert h2_request_fields(head, None, te_trailers=True)[4:] == [(b"x-b", b"2"), (b"te", b"trailers")]


def test_h2_fields_absolute_form_and_no_host() -> None:
    fields = dict(h2_request_fields(_head(b"http://other:81/p", fields=[]), "10.0.0.1:80", False))
    assert fields[b":authority"] == b"other:81" and fields[b":path"] == b"/p"
    fields = dict(h2_request_fields(_head(b"/p", fields=[]), "10.0.0.1:80", False))  # HTTP/1.0 without Host
    assert fields[b":authority"] == b"10.0.0.1:80"
    fields = dict(h2_request_fields(_head(b"http://bare", fields=[]), None, False))
    assert fields[b":authority"] == b"bare" and fields[b":path"] == b"/"


class _Sink:
    """A ResponseSink recording the neutral heads the HTTP/1.1 upstream codec delivers."""

    is_head = False

    def __init__(self) -> None:
        self.heads: list = []
        self.ds = SimpleNamespace(flush=lambda: None)

    def on_response_head(self, head) -> None:
        self.heads.append(head)

    def on_response_body(self, data: bytes) -> None:
        pass

    def on_response_trailers(self, trailers) -> None:
        pass

    def on_response_complete(self) -> None:
        pass

    def on_upstream_protocol_error(self) -> None:
        self.heads.append("protocol error")

    def on_upstream_upgraded(self, conn, rest: bytes) -> None:
        pass


def _parse(response: bytes):
    conn = UpstreamConnection(SimpleNamespace(), ("127.0.0.1", 80, None, 0))  # type: ignore[arg-type]
    sink = conn.exchange = _Sink()  # type: ignore[assignment]
    conn.data_received(response)
    return sink.heads[0]


def test_h1_upstream_codec_delivers_an_end_to_end_head() -> None:
    head = _parse(b"HTTP/1.1 200 Fine\r\nContent-Length: 2\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n"
                  b"Keep-Alive: timeout=5\r\nTE: trailers\r\nX-End: 2\r\n\r\nok")
    assert (head.status, head.reason, head.length, head.until_close, head.reusable) == (200, b"Fine", 2, False, True)
    assert head.fields == [(b"x-end", b"2")] and head.upgrade is None
    head = _parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-A: 1\r\n\r\nbody")
    assert head.length is None and head.until_close and not head.reusable and head.fields == [(b"x-a", b"1")]
    head = _parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert head.length is None and not head.until_close and head.reusable and head.fields == []


def test_h1_upstream_codec_names_a_switch_only_with_connection_upgrade() -> None:
    switched = _parse(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert switched.upgrade == b"websocket" and switched.fields == []
    assert _parse(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n").upgrade is None
