"""One hop-by-hop set (agent/proxy/http1.py HOP_BY_HOP) for every codec: the h2 side's sets are derived from it,
and h2 trailers are filtered like HTTP/1.1 ones (before, h2.py kept its own list and relayed Host and framing
fields in a client's trailers to the upstream)."""

from __future__ import annotations

from pathlib import Path

from planemesh.agent.proxy import h2_stream, h2_upstream, http1, messages
from planemesh.agent.proxy.h2_stream import Bridge
from planemesh.agent.proxy.upstream_request import UpstreamRequest

# RFC 9113 8.2.2: fields an h2 message must not carry (te only as "te: trailers").
CONNECTION_SPECIFIC = {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}


def test_h2_sets_are_derived_from_the_one_hop_by_hop_set() -> None:
    assert http1.HOP_BY_HOP_H2 == CONNECTION_SPECIFIC
    assert http1.HOP_BY_HOP_H2 == http1.HOP_BY_HOP - http1.H2_END_TO_END
    assert h2_stream.HOP_BY_HOP_H2 is http1.HOP_BY_HOP_H2
    assert http1.HOP_BY_HOP - {b"content-length"} == h2_upstream._RESPONSE_DROP
    assert http1.HOP_BY_HOP | {b"host"} == messages.H2_REQUEST_DROP


def test_client_trailers_lose_host_and_framing_fields_like_on_http1() -> None:
    bridge = Bridge.__new__(Bridge)  # only what on_trailers touches: a stream not routed yet
    bridge.req_done = False
    bridge.held = None
    bridge.routed = False
    bridge.req_head = None
    bridge.upreq = UpstreamRequest(None)  # type: ignore[arg-type]
    sent = [
        (b"grpc-status", b"0"),
        (b"Host", b"admin.internal"),  # trailers must not route (RFC 9110 6.5.1)
        (b"content-length", b"5"),
        (b"trailer", b"x"),
        (b"te", b"trailers"),
        (b"connection", b"close"),
        (b":path", b"/smuggled"),
        (b"x-checksum", b"abc"),
    ]
    bridge.on_trailers(None, sent)
    assert bridge.upreq.trailers == [(b"grpc-status", b"0"), (b"x-checksum", b"abc")]  # what goes upstream
    assert bridge.req_done


def test_no_other_copy_of_the_hop_by_hop_set_in_agent() -> None:
    """Only http1.py spells the hop-by-hop names out as bytes; every other module derives its set from HOP_BY_HOP."""
    agent = Path(__file__).resolve().parents[2] / "agent"
    copies = [
        str(f.relative_to(agent))
        for f in agent.rglob("*.py")
        if f.name != "http1.py" and any(name in f.read_text() for name in ('b"proxy-connection"', 'b"keep-alive"'))
    ]
    assert not copies, copies
