"""An h2 request stream's fields, pure: the request head split for the pipeline and the upstream, and the
fields of a proxy-made answer (an HTTP status, or a trailers-only gRPC status). Used by h2_stream.Bridge."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from planemesh.agent.proxy.h2 import GRPC_STATUS
from planemesh.agent.proxy.http1 import HOP_BY_HOP_H2
from planemesh.agent.proxy.request_head import (
    new_request_id,
    prefix_rewritten,
    route_request_headers,
    with_trace_context,
)
from planemesh.agent.proxy.xfcc import XFCC
from planemesh.agent.proxy.xfcc import combined as xfcc_combined

if TYPE_CHECKING:
    from planemesh.model.config import Route

Fields = list[tuple[bytes, bytes]]


def split_request(
    headers: Fields, peer_ip: bytes, transport: Any = None
) -> tuple[Fields, Fields, bytes, bytes, bytes | None, bool, bytes]:
    """One pass over a request's fields: (pseudo-headers, what goes upstream, :method, :path, :authority, gRPC or
    not, x-request-id). Connection-specific fields are dropped (te only as "te: trailers"), x-request-id kept or
    added, x-forwarded-for extended with the client's address, x-forwarded-client-cert decided from the
    connection (`transport`; a client must not forge it, xfcc.py)."""
    pseudo = []
    fields = []
    method = path = b""
    authority = None
    grpc = False
    rid = xff = None
    xfcc: list[bytes] = []
    for field in headers:
        n = field[0]
        if n[:1] == b":":
            pseudo.append(field)
            if n == b":method":
                method = field[1]
            elif n == b":path":
                path = field[1]
            elif n == b":authority":
                authority = field[1]
        elif n in HOP_BY_HOP_H2:
            continue
        elif n == b"te":
            if field[1] == b"trailers":
                fields.append(field)
        elif n == b"x-forwarded-for":
            xff = field[1]
        elif n == XFCC:
            xfcc.append(field[1])
        else:
            if n == b"content-type":
                grpc = field[1].startswith(b"application/grpc")
            elif n == b"x-request-id":
                rid = field[1]
            fields.append(field)
    if rid is None:
        rid = new_request_id()
        fields.append((b"x-request-id", rid))
    fields.append((b"x-forwarded-for", xff + b", " + peer_ip if xff else peer_ip))
    if (client_cert := xfcc_combined(transport, xfcc)) is not None:
        fields.append((XFCC, client_cert))
    return pseudo, fields, method, path, authority, grpc, rid


def mutated_request(
    route: Route | None, pseudo: Fields, fields: Fields, path: bytes, authority: bytes | None, trace: float | None
) -> tuple[Fields, Fields, bytes, bytes | None]:
    """(pseudo-headers, fields, :path, :authority) upstream: the route's prefix and host rewrites, its request
    header changes, and this hop's trace context (request_head.py, as the HTTP/1 head gets them; `trace`: the
    listener's sampling, None: none added)."""
    action = route.action if route is not None else None
    if action is not None:
        if action.prefix_rewrite is not None:
            new_path = prefix_rewritten(route, path)  # type: ignore[arg-type]
            if new_path is not path:
                path = new_path
                pseudo = [(b":path", path) if n == b":path" else (n, v) for n, v in pseudo]
        if action.host_rewrite is not None:
            authority = action.host_rewrite.encode()
            pseudo = [(b":authority", authority) if n == b":authority" else (n, v) for n, v in pseudo]
            fields = [(n, v) for n, v in fields if n != b"host"]
    if route is not None and (route.request_headers_to_add or route.request_headers_to_remove):
        fields = route_request_headers(route, fields)
    return pseudo, with_trace_context(fields, trace), path, authority


def local_answer(status: int, message: str, grpc: bool, body: bytes | None, extra=()) -> tuple[Fields, bytes | None]:
    """The HEADERS (and DATA, None: the HEADERS end the stream) of a proxy-made answer: for gRPC a trailers-only
    response with the gRPC status of `status` and `message`; else `status` with `body` (default: the message and
    a newline). `extra`: more response fields."""
    if grpc:
        return [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(GRPC_STATUS.get(status, 2)).encode()),
            (b"grpc-message", message.encode("latin-1", "replace")),
            *extra,
        ], None
    if body is None:
        body = (message + "\n").encode("latin-1", "replace")
    head = [
        (b":status", str(status).encode()),
        (b"content-type", b"text/plain"),
        (b"content-length", str(len(body)).encode()),
    ]
    if extra:
        head += extra
    return head, body
