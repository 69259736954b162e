"""An h2 stream's fields (agent/proxy/h2_fields.py), pure: the request head split, the route's changes with the
trace context, and the fields of proxy-made answers (HTTP and gRPC)."""

from __future__ import annotations

import re

import pytest

from planemesh.agent.proxy.h2_fields import local_answer, mutated_request, split_request
from planemesh.model.config import HeaderValue, Route, RouteAction, RouteMatch

HEAD = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/api/x?q=1"), (b":authority", b"front"),
        (b"content-type", b"application/grpc+proto"), (b"connection", b"close"), (b"te", b"trailers"),
        (b"te", b"gzip"), (b"x-forwarded-for", b"10.0.0.9"), (b"x-request-id", b"rid-1"), (b"x-secret", b"s")]


def test_split_request() -> None:
    pseudo, fields, method, path, authority, grpc, rid = split_request(HEAD, b"10.1.1.1")
    assert [n for n, _ in pseudo] == [b":method", b":scheme", b":path", b":authority"]
    assert (method, path, authority, grpc, rid) == (b"POST", b"/api/x?q=1", b"front", True, b"rid-1")
    assert fields == [(b"content-type", b"application/grpc+proto"), (b"te", b"trailers"), (b"x-request-id", b"rid-1"),
                      (b"x-secret", b"s"), (b"x-forwarded-for", b"10.0.0.9, 10.1.1.1")]
    _, fields, *_, rid = split_request([(b":path", b"/")], b"10.1.1.1")
    assert (b"x-request-id", rid) in fields and rid and fields[-1] == (b"x-forwarded-for", b"10.1.1.1")


ROUTE = Route(match=RouteMatch(prefix="/api/"),
              action=RouteAction(cluster="svc", prefix_rewrite="/v2/", host_rewrite="backend.internal"),
              request_headers_to_add=(HeaderValue("x-added", "1"),), request_headers_to_remove=("x-secret",))


@pytest.mark.parametrize(("route", "path", "authority", "gone", "added"), [
    (ROUTE, b"/v2/x?q=1", b"backend.internal", {b"x-secret"}, {b"x-added"}),
    (Route(action=RouteAction(cluster="svc")), b"/api/x?q=1", b"front", set(), set()),
    (None, b"/api/x?q=1", b"front", set(), set()),
])
def test_mutated_request(route, path, authority, gone, added) -> None:
    pseudo, fields, *_ = split_request([*HEAD, (b"traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")],
                                       b"10.1.1.1")
    pseudo, fields, up_path, up_authority = mutated_request(route, pseudo, fields, b"/api/x?q=1", b"front", 100.0)
    names = {n for n, _ in fields}
    assert (up_path, up_authority) == (path, authority)
    assert dict(pseudo)[b":path"] == path and dict(pseudo)[b":authority"] == authority
    assert not names & gone and added <= names
    trace = dict(fields)[b"traceparent"].decode()
    assert re.fullmatch(r"00-a{32}-[0-9a-f]{16}-01", trace) and not trace.endswith("b" * 16 + "-01")
    assert [n for n, _ in fields].count(b"traceparent") == 1


def test_mutated_request_without_tracing_keeps_the_client_trace() -> None:
    incoming = b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"
    pseudo, fields, *_ = split_request([*HEAD, (b"traceparent", incoming)], b"10.1.1.1")
    _, out, *_ = mutated_request(None, pseudo, fields, b"/api/x?q=1", b"front", None)
    assert out == fields and dict(out)[b"traceparent"] == incoming


def test_local_answer() -> None:
    head, body = local_answer(503, "no healthy upstream", False, None, ((b"x-planemesh-overloaded", b"memory"),))
    assert body == b"no healthy upstream\n"
    assert head == [(b":status", b"503"), (b"content-type", b"text/plain"), (b"content-length", b"20"),
                    (b"x-planemesh-overloaded", b"memory")]
    head, body = local_answer(308, "", False, b"", ((b"location", b"http://a/b"),))
    assert body == b"" and (b"location", b"http://a/b") in head
    head, body = local_answer(504, "upstream request timeout", True, None)
    assert body is None and dict(head)[b"grpc-status"] == b"4" and dict(head)[b":status"] == b"200"
    assert dict(local_answer(418, "x", True, None)[0])[b"grpc-status"] == b"2"  # unknown: UNKNOWN
