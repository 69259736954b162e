"""What the proxy adds to and changes in a request on its way upstream, and a route's response header changes:
the upstream request head (rewrites, route header changes, trace context, x-request-id, x-forwarded-*)."""

from __future__ import annotations

import itertools
import os
import random
from operator import itemgetter
from types import MappingProxyType
from typing import TYPE_CHECKING

from planemesh.agent.proxy.http1 import HOP_BY_HOP
from planemesh.agent.proxy.messages import RequestHead
from planemesh.agent.proxy.tracing import TRACE_HEADERS, outgoing_trace_headers
from planemesh.agent.proxy.xfcc import DROP_WITH_XFCC, XFCC
from planemesh.model.config import DEFAULT_TRACE

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import H1Request as Exchange
    from planemesh.model.config import Route

_getrandbits = random.getrandbits
# Request ids: uuid4 text, a random per-process part plus a counter. Ids need uniqueness, not secrecy;
# uuid.uuid4() costs a getrandom() syscall per request.
_RID_PREFIX = ""
_rid_counter = itertools.count()


def _new_request_ids() -> None:
    global _RID_PREFIX, _rid_counter
    bits = _getrandbits
    _RID_PREFIX = f"{bits(32):08x}-{bits(16):04x}-4{bits(12):03x}-{0x8000 | bits(14):04x}-"
    _rid_counter = itertools.count(_getrandbits(40))


_new_request_ids()
# A worker forked from the zygote (agent/zygote.py) gets its own part: forked workers must not hand out the same ids
# (the random module reseeds itself in a forked child, so _getrandbits differs there).
os.register_at_fork(after_in_child=_new_request_ids)
FORWARDED_PROTO = (b"x-forwarded-proto", b"http")
# A request carrying none of these has nothing dropped on its way upstream and no incoming trace context.
_DROP_OR_TRACE = DROP_WITH_XFCC | TRACE_HEADERS
_NO_TRACE: MappingProxyType[str, str] = MappingProxyType({})
_name = itemgetter(0)


def new_request_id() -> bytes:
    return (_RID_PREFIX + (next(_rid_counter) & 0xFFFFFFFFFFFF).to_bytes(6, "big").hex()).encode()


def header_map(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Request headers as route matching reads them: lower-case name -> value, repeats joined with ","."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1")
        v = value.decode("latin-1")
        out[key] = f"{out[key]},{v}" if key in out else v
    return out


def response_headers(route: Route, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A route's response header manipulation: remove, then add (append) or set (append=False)."""
    if route.response_headers_to_remove:
        gone = {n.lower().encode() for n in route.response_headers_to_remove}
        headers = [(n, v) for n, v in headers if n.lower() not in gone]
    for hv in route.response_headers_to_add:
        name = hv.name.lower().encode()
        if not hv.append:
            headers = [(n, v) for n, v in headers if n.lower() != name]
        headers = [*headers, (name, hv.value.encode("latin-1"))]
    return headers


def prefix_rewritten(route: Route, target: bytes) -> bytes:
    """The request-target (or :path) after the route's prefix_rewrite (`target` itself when it does not apply)."""
    action = route.action
    if action is not None and action.prefix_rewrite is not None:
        prefix = route.match.prefix
        if prefix and target.startswith(prefix.encode()):
            return action.prefix_rewrite.encode() + target[len(prefix) :]
    return target


def route_request_headers(route: Route, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A route's request header manipulation (lower-case names): remove, then add (append) or set."""
    if route.request_headers_to_remove:
        gone = {n.lower().encode() for n in route.request_headers_to_remove}
        headers = [(n, v) for n, v in headers if n not in gone]
    else:
        headers = list(headers)
    for hv in route.request_headers_to_add:
        name = hv.name.lower().encode()
        if not hv.append:
            headers = [(n, v) for n, v in headers if n != name]
        headers.append((name, hv.value.encode()))
    return headers


def split_trace(headers: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], dict[str, str]]:
    """The headers without the incoming trace context, and that context (lower-case name -> value)."""
    for name, _ in headers:
        if name in TRACE_HEADERS:
            break
    else:  # none (most requests): no copy
        return headers, {}
    incoming = {n.decode("latin-1"): v.decode("latin-1") for n, v in headers if n in TRACE_HEADERS}
    if incoming:
        headers = [(n, v) for n, v in headers if n not in TRACE_HEADERS]
    return headers, incoming


def with_trace_context(headers: list[tuple[bytes, bytes]], trace: float | None) -> list[tuple[bytes, bytes]]:
    """The headers with this hop's trace context in place of the incoming one (tracing.py); `trace`: the
    listener's sampling percentage, None: no tracing (the headers as they are)."""
    if trace is None:
        return headers
    headers, incoming = split_trace(headers)
    return headers + outgoing_trace_headers(incoming, sampling=trace)


def request_head(
    ex: Exchange, route: Route | None, upgrade: bytes = b"", trace: float | None = DEFAULT_TRACE
) -> RequestHead:
    """The request head sent upstream, codec-neutral (messages.py). Sets ex.request_id (when the client sent none)
    and ex.xff. `upgrade`: the Upgrade a tunnel request asks for; `trace`: the listener's trace sampling (None:
    no trace context added, the client's trace headers pass as they are). The headers the client's Connection
    header named are already gone (request_checks): what the proxy adds here stays."""
    target = ex.target
    headers = ex.headers
    if route is not None:
        action = route.action
        if action is not None and action.prefix_rewrite is not None:
            target = prefix_rewritten(route, target)
        if action is not None and action.host_rewrite is not None:
            headers = [(n, v) for n, v in headers if n != b"host"]
            headers.insert(0, (b"host", action.host_rewrite.encode()))
        if route.request_headers_to_remove or route.request_headers_to_add:
            headers = route_request_headers(route, headers)
    # x-forwarded-client-cert: dropped unless the mTLS connection's listener forwards it (agent/proxy/xfcc.py)
    ssl_object = ex.ds.ssl_object
    xfcc = getattr(ssl_object, "planemesh_xfcc", None) if ssl_object is not None else None
    if xfcc is None and (_DROP_OR_TRACE if trace is not None else DROP_WITH_XFCC).isdisjoint(map(_name, headers)):
        # Nothing to drop and no incoming trace context (most requests): the fields as they are, checked in C.
        fields = list(headers)
        if trace is not None:
            fields += outgoing_trace_headers(_NO_TRACE, sampling=trace)
    else:
        incoming_trace: dict[str, str] = {}
        if trace is not None:
            headers, incoming_trace = split_trace(headers)
        drop = HOP_BY_HOP if xfcc is not None and xfcc == (True, None) else DROP_WITH_XFCC
        fields = [(n, v) for n, v in headers if n not in drop]
        if xfcc is not None and xfcc != (True, None):  # sanitize_set: ours only; append_forward: theirs, then ours
            prior = [v for n, v in headers if n == XFCC] if xfcc[0] else []
            if xfcc[1] is not None:
                fields.append((XFCC, b", ".join([*prior, xfcc[1]])))
        if trace is not None:
            fields += outgoing_trace_headers(incoming_trace, sampling=trace)
    if ex.request_id is None:
        rid = new_request_id()
        ex.request_id = rid.decode()
        fields.append((b"x-request-id", rid))
    peer = ex.ds.peer_ip
    xff = ex.xff = f"{ex.xff}, {peer}" if ex.xff else peer
    fields.append((b"x-forwarded-for", xff.encode("latin-1")))
    if not ex.has_xfp:
        fields.append(FORWARDED_PROTO)
    return RequestHead(ex.method_b, target, fields, ex.req_length, ex.req_chunked, upgrade)
