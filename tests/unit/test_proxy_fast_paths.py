"""The per-request fast paths of the proxy core (perf, issue 12) give what the general paths give."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from planemesh.agent.proxy.accesslog import AccessRecord, _q, format_start_time, format_text
from planemesh.agent.proxy.balancer import Balancer
from planemesh.agent.proxy.http1 import HOP_BY_HOP, append_headers
from planemesh.agent.proxy.lb import ClusterLb
from planemesh.agent.proxy.messages import ResponseHead
from planemesh.agent.proxy.request_head import request_head, split_trace
from planemesh.agent.proxy.response_h1 import H1ResponseWriter
from planemesh.agent.proxy.tracing import outgoing_trace_headers
from planemesh.model.config import Cluster, ClusterKind, Endpoint, LbPolicy, OutlierDetection


def test_new_trace_never_all_zero_ids() -> None:
    out = dict(outgoing_trace_headers({}, lambda n: 0))
    assert out[b"traceparent"] == b"00-" + b"0" * 31 + b"1-" + b"0" * 15 + b"1-01"
    assert out[b"x-b3-traceid"] == b"0" * 31 + b"1" and out[b"x-b3-spanid"] == b"0" * 15 + b"1"
    assert out[b"x-b3-sampled"] == b"1"


def test_split_trace_without_context_keeps_the_list() -> None:
    headers = [(b"host", b"a"), (b"user-agent", b"x")]
    same, incoming = split_trace(headers)
    assert same is headers and incoming == {}
    rest, incoming = split_trace([*headers, (b"x-b3-traceid", b"ab" * 8)])
    assert rest == headers and incoming == {"x-b3-traceid": "ab" * 8}


def _cluster(policy: LbPolicy) -> Cluster:
    return Cluster("c", ClusterKind.STATIC, endpoints=(Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)),
                   lb_policy=policy)


def test_only_least_request_counts_active_requests() -> None:
    rr, least = ClusterLb(_cluster(LbPolicy.ROUND_ROBIN)), ClusterLb(_cluster(LbPolicy.LEAST_REQUEST))
    for lb in (rr, least):
        lb.started(lb.cluster.endpoints[0])
    assert rr.active == {} and least.active == {least.cluster.endpoints[0]: 1}
    least.ended(least.cluster.endpoints[0])
    assert least.active == {}


def test_access_line_without_escapes_matches_the_quoted_form() -> None:
    rec = AccessRecord(1764123456.789, "GET", "/p?q=1", "HTTP/1.1", 200, "", 1, 2, 3, None, "10.0.0.1", None,
                       "rid", "svc:80", "10.0.0.2:80", "plane")
    expected = (f"[{format_start_time(rec.start_time)}] {_q('GET /p?q=1 HTTP/1.1')} 200 - 1 2 3 - "
                f"{_q('10.0.0.1')} {_q(None)} {_q('rid')} {_q('svc:80')} {_q('10.0.0.2:80')} plane\n")
    assert format_text(rec) == expected


def _h1_request(headers: list[tuple[bytes, bytes]], ssl_object: object = None) -> SimpleNamespace:
    ds = SimpleNamespace(ssl_object=ssl_object, peer_ip="10.0.0.9")
    return SimpleNamespace(ds=ds, target=b"/p", headers=headers, method_b=b"GET", request_id=None, xff=None,
                           has_xfp=False, req_length=0, req_chunked=False)


def test_request_head_without_anything_to_drop_matches_the_filtered_form() -> None:
    """The fast path (no hop-by-hop field, no trace context, no TLS: the fields copied in C) gives the fields
    the general path gives once it has dropped what it drops."""
    plain = request_head(_h1_request([(b"host", b"a"), (b"user-agent", b"x")]), None)  # type: ignore[arg-type]
    general = request_head(_h1_request([(b"host", b"a"), (b"te", b"trailers"), (b"user-agent", b"x"),
                                        (b"connection", b"keep-alive")]), None)  # type: ignore[arg-type]
    names = [n for n, _ in plain.fields]
    assert names == [n for n, _ in general.fields] == [
        b"host", b"user-agent", b"traceparent", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled",
        b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto"]
    assert dict(plain.fields)[b"x-forwarded-for"] == b"10.0.0.9"


def test_request_head_keeps_an_incoming_trace_and_honours_xfcc() -> None:
    trace = b"00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-01"
    head = request_head(_h1_request([(b"host", b"a"), (b"traceparent", trace)]), None)  # type: ignore[arg-type]
    assert dict(head.fields)[b"x-b3-traceid"] == b"ab" * 16 and dict(head.fields)[b"x-b3-parentspanid"] == b"cd" * 8
    ours = SimpleNamespace(planemesh_xfcc=(False, b"By=spiffe://td/ns/a/sa/b"))  # sanitize_set on an mTLS listener
    head = request_head(_h1_request([(b"host", b"a"), (b"x-forwarded-client-cert", b"forged")], ours), None)  # type: ignore[arg-type]
    assert [v for n, v in head.fields if n == b"x-forwarded-client-cert"] == [b"By=spiffe://td/ns/a/sa/b"]


@pytest.mark.parametrize("fields", [
    [], [(b"a", b"1"), (b"b", b"2")], [(b"a", b"1"), (b"connection", b"x"), (b"content-length", b"3"), (b"b", b"2")],
])
def test_append_headers_in_c_matches_the_loop(fields: list[tuple[bytes, bytes]]) -> None:
    parts: list[bytes] = []
    append_headers(parts, fields, HOP_BY_HOP)
    assert b"".join(parts) == b"".join(n + b": " + v + b"\r\n" for n, v in fields if n not in HOP_BY_HOP)


def test_h1_response_head_filters_hop_by_hop_fields_a_route_added() -> None:
    ds = SimpleNamespace(out=[], proxy=SimpleNamespace(draining=False))
    ex = SimpleNamespace(ds=ds, version="1.1", req_done=True, keep_alive=True, relay=SimpleNamespace(body_allowed=True))
    H1ResponseWriter(ex).response_head(200, [(b"a", b"1"), (b"keep-alive", b"timeout=5")],  # type: ignore[arg-type]
                                       ResponseHead(200, [], 3))
    assert ds.out == [b"HTTP/1.1 200 OK\r\na: 1\r\ncontent-length: 3\r\n\r\n"]


def test_balancer_report_still_counts_least_request_and_outliers() -> None:
    """report() returns at once only when nothing keeps count: least request's active counts and outlier
    detection still see every attempt."""
    balancer = Balancer(SimpleNamespace(clusters={}))  # type: ignore[arg-type]
    least = _cluster(LbPolicy.LEAST_REQUEST)
    ep = balancer.start_endpoint(least)
    assert ep is not None and balancer.lb(least).active == {ep: 1}
    balancer.report(least, ep, 200)
    assert balancer.lb(least).active == {}
    ejecting = Cluster("o", ClusterKind.STATIC, endpoints=least.endpoints,
                       outlier=OutlierDetection(consecutive_5xx=1, max_ejection_percent=100))
    ep = balancer.start_endpoint(ejecting)
    balancer.report(ejecting, ep, 503)  # type: ignore[arg-type]
    assert balancer.outlier(ejecting).is_ejected(ep)  # type: ignore[union-attr]
