"""The per-request fast paths of the proxy core (perf, issue 12) give what the general paths give."""

from __future__ import annotations

from planemesh.agent.proxy.accesslog import AccessRecord, _q, format_start_time, format_text
from planemesh.agent.proxy.lb import ClusterLb
from planemesh.agent.proxy.request_head import split_trace
from planemesh.agent.proxy.tracing import outgoing_trace_headers
from planemesh.model.config import Cluster, ClusterKind, Endpoint, LbPolicy


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
