"""Checks and normalisation of a parsed HTTP/1.x request head before it is routed, without I/O (RFC 9112):
the version, the request target's form (absolute-form's authority replaces Host, fragments go), Host itself,
the headers a Connection header makes hop-by-hop, and Expect. A request refused here gets a status and a body
saying why, then the connection closes (the caller raises Refused from a parser callback)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from planemesh.agent.proxy.http1 import HOP_BY_HOP, dropped_names, local_reply

if TYPE_CHECKING:
    from planemesh.agent.proxy.contracts import H1Request as Exchange

# RFC 3986 host [":" port]: an IP-literal, or a reg-name (unreserved, pct-encoded, sub-delims; IPv4 is one too).
# No userinfo ("@"), no path or whitespace. An empty Host is valid (RFC 9112 3.2).
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?")
_SCHEMES = (b"http://", b"https://")
_REQUEST_ID = b"x-request-id"
_XFF = b"x-forwarded-for"
_XFP = b"x-forwarded-proto"
_UA = b"user-agent"
EXPECT_NONE, EXPECT_CONTINUE, CONTINUE_SENT = 0, 1, 2


class Refused(Exception):
    """Raised in a parser callback for a request the proxy will not take: answered with `status` and a body
    saying why, then the connection closes (httptools re-raises it as the context of its callback error)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(body)
        self.status = status
        self.reply = local_reply(status, body, close=True)


_VALID_HOSTS: set[bytes] = set()  # hosts seen valid (a handful per plane): a set lookup instead of the regex


def valid_host(value: bytes) -> bool:
    if value in _VALID_HOSTS:
        return True
    if _HOST.fullmatch(value) is None:
        return False
    if len(_VALID_HOSTS) < 4096:  # values come from clients: keep the memo bounded
        _VALID_HOSTS.add(value)
    return True


def split_absolute(target: bytes) -> tuple[bytes, bytes] | None:
    """An absolute-form target (`http://host[:port]/path?query`) -> (authority, origin-form target); None when
    `target` is not one (origin-form, asterisk-form)."""
    scheme_end = target.find(b"://")
    if scheme_end < 0 or target[: scheme_end + 3].lower() not in _SCHEMES:
        return None
    rest = target[scheme_end + 3 :]
    cut = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    path = rest[cut:]
    if path[:1] != b"/":
        path = b"/" + path  # "http://a" -> "/", "http://a?q" -> "/?q"
    return rest[:cut], path


def check_head(ex: Exchange, connect: bool) -> None:
    """Validate and normalise `ex`'s head in place (after the parser's on_headers_complete); raises Refused.
    The common request (origin-form, one valid Host, no Connection options) costs a few comparisons."""
    version = ex.version
    if version != "1.1":
        if version != "1.0":
            raise Refused(505, b"HTTP version not supported\n")
        if ex.req_chunked:  # RFC 9112 6.1: Transfer-Encoding in 1.0 is faulty framing
            raise Refused(400, b"transfer-encoding in an HTTP/1.0 request\n")
    if ex.authority is None and version == "1.1" and not connect:  # its value was checked by check_host
        raise Refused(400, b"missing Host header\n")
    target = ex.target
    if not connect:
        if b"#" in target:
            target = ex.target = target.partition(b"#")[0]  # a fragment is the client's alone (RFC 9112 3.2)
        if target[:1] != b"/" and target != b"*":
            _absolute_form(ex, target)
    if ex.connection_values is not None:
        _strip_connection_options(ex)
    if ex.expect_continue and (version != "1.1" or not (ex.req_length or ex.req_chunked)):
        ex.expect_continue = EXPECT_NONE  # a 1.0 client's is ignored (RFC 9110 10.1.1); no body, nothing to wait for


def check_host(ex: Exchange, value: bytes) -> None:
    """A Host header line (RFC 9112 3.2: one, valid, or 400)."""
    if ex.authority is not None:
        raise Refused(400, b"more than one Host header\n")
    if value not in _VALID_HOSTS and not valid_host(value):
        raise Refused(400, b"invalid Host header\n")
    ex.authority = value.decode("latin-1")


def check_expect(ex: Exchange, value: bytes) -> None:
    """Expect: 100-continue is answered by the proxy once the request is routed (Envoy's default, without
    proxy_100_continue) and never forwarded; any other expectation gets 417 (RFC 9110 10.1.1)."""
    if value.strip().lower() != b"100-continue":
        raise Refused(417, b"unsupported expectation\n")
    ex.expect_continue = EXPECT_CONTINUE


def _absolute_form(ex: Exchange, target: bytes) -> None:
    """RFC 9112 3.2.2: the authority of an absolute-form target replaces Host; routed on it and sent upstream
    in origin-form with that Host (as Envoy does)."""
    split = split_absolute(target)
    if split is None:
        raise Refused(400, b"invalid request target\n")
    authority, ex.target = split
    if not authority or not valid_host(authority):
        raise Refused(400, b"invalid authority in the request target\n")
    ex.authority = authority.decode("latin-1")
    ex.headers = [(b"host", authority), *((n, v) for n, v in ex.headers if n != b"host")]


def _strip_connection_options(ex: Exchange) -> None:
    """The headers the client's Connection header names are hop-by-hop: removed here, from what the client sent,
    before the proxy adds its own (which are then never removed). Host is never removed (NEVER_HOP_BY_HOP)."""
    named = dropped_names(ex.connection_values)  # type: ignore[arg-type]
    if named is HOP_BY_HOP:
        return
    gone = named - HOP_BY_HOP
    ex.headers = [(n, v) for n, v in ex.headers if n not in gone]
    if _REQUEST_ID in gone:
        ex.request_id = None  # the proxy makes a fresh one
    if _XFF in gone:
        ex.xff = None
    if _XFP in gone:
        ex.has_xfp = False
    if _UA in gone:
        ex.user_agent = None

