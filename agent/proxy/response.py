"""The response relay of one request, whatever the codecs on either side (a ResponseRelay, owned by the request:
exchange.Exchange for HTTP/1.x, h2_stream.Bridge for an h2 stream).

An upstream stream (upstream.UpstreamConnection for HTTP/1.1, h2_upstream.H2ClientStream for an h2 stream)
delivers the neutral response events (contracts.ResponseSink: a messages.ResponseHead, body, trailers, the end, a
lost connection, a protocol error); the relay decides what they mean (a retry on the status, the access log's
URX, the route's response header changes, whether the upstream connection may be reused, what a lost connection
means once the response started) and hands the response to the request's downstream codec, a
contracts.DownstreamSink (response_h1.H1ResponseWriter, or the h2 stream itself), which frames it. Written
once for every pair of codecs: there is no per-pair adapter.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.request_head import response_headers
from planemesh.agent.proxy.tunnel import upgrade_to_tunnel

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import DownstreamSink, Fields, RelayOwner
    from planemesh.agent.proxy.contracts import UpstreamStream as UpstreamConnection
    from planemesh.agent.proxy.messages import ResponseHead

_perf = time.perf_counter


class ResponseRelay:
    __slots__ = ("body_allowed", "bytes_tx", "ds", "ex", "is_head", "sink", "started", "status", "up_close",
                 "up_reusable", "upstream_ms")

    def __init__(self, ex: RelayOwner, sink: DownstreamSink) -> None:
        self.ex = ex
        self.ds = ex.ds  # what the upstream stream flushes and pauses (contracts.RequestSource)
        self.sink = sink
        self.status = 0
        self.started = False  # a response head (ours or the upstream's) went to the client
        self.bytes_tx = 0
        self.upstream_ms: int | None = None
        self.up_reusable = False  # the upstream connection may carry another request afterwards
        self.up_close = False  # the body ends with the upstream connection's close
        self.body_allowed = True  # a response to HEAD, a 204 or a 304 has no body, whatever comes
        self.is_head = False  # a response to HEAD (set with the request's own, by the downstream codec)

    def on_response_head(self, head: ResponseHead) -> None:
        """A response head from either upstream codec: retried, or handed to the downstream codec."""
        ex = self.ex
        if ex.finished:
            return
        status = head.status
        if status == 101 and not (ex.tunnel and head.upgrade is not None):
            self.on_upstream_protocol_error()  # a switch nobody asked for, or without Upgrade + Connection: upgrade
            return
        if status < 200 and status != 101:  # interim (100 Continue, 103): the downstream codec decides
            self.sink.interim(head)
            return
        attempt = ex.attempt
        attempt.end(status)
        retries = attempt.retries
        retriable = status >= 500 or status in retries.policy.retriable_status_codes
        if retriable and ex.req_done and attempt.may_retry("status", status):
            attempt.retry()  # this response is dropped with its connection
            return
        if retriable and retries.policy.num_retries > 0 and retries.tries_left <= 0:
            ex.flags = flags.URX
        self.upstream_ms = int((_perf() - attempt.t_upstream) * 1000)
        self.status = status
        self.started = True
        self.up_reusable = head.reusable
        self.body_allowed = body = not self.is_head and status >= 200 and status != 204 and status != 304
        self.up_close = body and head.length is None and head.until_close
        headers = head.fields  # what the upstream's Connection named is gone already, before the route adds any
        route = ex.route
        if route is not None and (route.response_headers_to_add or route.response_headers_to_remove):
            headers = response_headers(route, headers)
        self.sink.response_head(status, headers, head)

    def on_response_body(self, data: bytes) -> None:
        if self.ex.finished or not self.body_allowed:  # DATA on a response without a body is dropped
            return
        self.bytes_tx += len(data)
        self.sink.response_body(data)

    def on_response_trailers(self, trailers: Fields) -> None:
        if not self.ex.finished:
            self.sink.response_trailers(trailers)

    def on_response_complete(self) -> None:
        ex = self.ex
        if ex.finished:
            return
        self.sink.response_end()
        attempt = ex.attempt
        conn = attempt.conn
        attempt.conn = None
        if conn is not None:
            conn.exchange = None
            # A connection that carried an upgrade request is never reused, whatever the answer was.
            if self.up_reusable and ex.req_done and not self.up_close and not ex.tunnel:
                self.ds.proxy.pool.release(conn)
            else:
                conn.close()
        ex.finish()

    def on_upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The upstream switched protocols (101): its connection and the client's become a byte tunnel;
        `rest` is what the upstream sent after its 101 head."""
        if self.ex.finished:
            return
        if self.status != 101:  # llhttp stopped for a switch, yet the status was not 101
            self.on_upstream_protocol_error()
            conn.close()
            return
        upgrade_to_tunnel(self.ex, conn, rest)  # type: ignore[arg-type]

    def on_upstream_protocol_error(self) -> None:
        ex = self.ex
        if ex.finished:
            return
        if self.started:
            ex.abort(flags.UPE)
        else:
            ex.reply(502, b"upstream protocol error\n", (), flags.UPE)
        self.ds.flush()

    def on_upstream_lost(self, conn: UpstreamConnection) -> None:
        """The upstream connection closed (or broke) before the response completed."""
        ex = self.ex
        if ex.finished:
            return
        ex.attempt.conn = None
        if not self.started:
            ex.attempt.lost(conn)
            return
        if self.up_close:  # close-delimited body: this is its end
            self.sink.response_end()
            ex.finish()
        else:
            ex.abort(flags.UC)
        self.ds.flush()
