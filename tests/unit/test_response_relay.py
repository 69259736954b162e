"""response.ResponseRelay on its own: the one relay between any upstream stream and any downstream codec decides
what a response means (retry on its status, URX, no body for HEAD/204/304, reuse or close of the upstream
connection, a lost upstream before or after the head, a close-delimited end) and hands only the response itself
to the request's DownstreamSink. Table-tested with a recording sink and attempt: no sockets, no codec."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from planemesh.agent.proxy import accesslog as flags
from planemesh.agent.proxy.messages import ResponseHead
from planemesh.agent.proxy.response import ResponseRelay
from planemesh.agent.proxy.retry import NO_RETRIES, Retries
from planemesh.model.config import RetryPolicy

RETRY_5XX = RetryPolicy(retry_on=("5xx",), num_retries=1)


class Sink:
    """A downstream codec (contracts.DownstreamSink) that records what it is asked to write."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def interim(self, head: ResponseHead) -> None:
        self.calls.append(("interim", head.status))

    def response_head(self, status: int, fields, head: ResponseHead) -> None:
        self.calls.append(("head", status, list(fields)))

    def response_body(self, data: bytes) -> None:
        self.calls.append(("body", data))

    def response_trailers(self, trailers) -> None:
        self.calls.append(("trailers", list(trailers)))

    def response_end(self) -> None:
        self.calls.append(("end",))


class Conn:
    reused = False

    def __init__(self) -> None:
        self.exchange = None
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Owner:
    """The request (contracts.RelayOwner) with a recording Attempt."""

    def __init__(self, retries: Retries = NO_RETRIES, req_done: bool = True) -> None:
        self.released: list = []
        pool = SimpleNamespace(release=self.released.append)
        self.ds = SimpleNamespace(proxy=SimpleNamespace(pool=pool), flush=lambda: None)
        self.finished = False
        self.req_done = req_done
        self.tunnel = 0
        self.route = None
        self.flags = ""
        self.calls: list[tuple] = []
        self.conn = Conn()
        self.attempt = SimpleNamespace(
            conn=self.conn, retries=retries, t_upstream=0.0,
            end=lambda status: self.calls.append(("end", status)),
            may_retry=lambda condition, status=0: retries.may_retry(condition, status, True),
            retry=lambda: self.calls.append(("retry",)),
            lost=lambda conn: self.calls.append(("lost",)),
        )

    def reply(self, status: int, body: bytes, headers=(), flag: str = "") -> None:
        self.calls.append(("reply", status, flag))
        self.finished = True

    def abort(self, flag: str) -> None:
        self.calls.append(("abort", flag))
        self.finished = True

    def finish(self, abort: bool = False) -> None:
        self.calls.append(("finish",))
        self.finished = True


def _relay(owner: Owner, is_head: bool = False) -> tuple[ResponseRelay, Sink]:
    sink = Sink()
    relay = ResponseRelay(owner, sink)
    relay.is_head = is_head
    return relay, sink


FIELDS = [(b"content-type", b"text/plain")]


@pytest.mark.parametrize(("case", "is_head", "status", "length", "until_close", "want_sink", "pooled"), [
    ("length body, reusable", False, 200, 5, False,
     [("head", 200, FIELDS), ("body", b"hello"), ("trailers", [(b"x-t", b"1")]), ("end",)], True),
    ("HEAD: the body is dropped", True, 200, 5, False, [("head", 200, FIELDS), ("trailers", [(b"x-t", b"1")]),
                                                          ("end",)], True),
    ("204: no body", False, 204, None, False, [("head", 204, FIELDS), ("trailers", [(b"x-t", b"1")]), ("end",)],
     True),
    ("close-delimited: never pooled", False, 200, None, True,
     [("head", 200, FIELDS), ("body", b"hello"), ("trailers", [(b"x-t", b"1")]), ("end",)], False),
])  # fmt: skip
def test_a_response_goes_to_the_sink_and_the_connection_is_pooled_or_closed(
    case, is_head, status, length, until_close, want_sink, pooled
) -> None:
    owner = Owner()
    relay, sink = _relay(owner, is_head)
    relay.on_response_head(ResponseHead(status, list(FIELDS), length, until_close, reusable=True))
    relay.on_response_body(b"hello")
    relay.on_response_trailers([(b"x-t", b"1")])
    relay.on_response_complete()
    assert sink.calls == want_sink, case
    assert (owner.released == [owner.conn]) is pooled and owner.conn.closed is not pooled
    assert owner.calls == [("end", status), ("finish",)] and relay.status == status and relay.started


def test_a_retriable_status_is_retried_not_relayed() -> None:
    owner = Owner(Retries(RETRY_5XX, None))
    relay, sink = _relay(owner)
    relay.on_response_head(ResponseHead(503, [], 0))
    assert owner.calls == [("end", 503), ("retry",)] and sink.calls == [] and not relay.started


def test_a_retriable_status_is_relayed_while_the_client_still_sends() -> None:
    owner = Owner(Retries(RETRY_5XX, None), req_done=False)
    relay, sink = _relay(owner)
    relay.on_response_head(ResponseHead(503, [], 0))
    assert sink.calls == [("head", 503, [])] and ("retry",) not in owner.calls


def test_the_last_retriable_answer_is_flagged_urx() -> None:
    retries = Retries(RETRY_5XX, None)
    retries.next_backoff(0.0)  # the one retry was taken
    owner = Owner(retries)
    relay, sink = _relay(owner)
    relay.on_response_head(ResponseHead(503, [], 0))
    assert owner.flags == flags.URX and sink.calls == [("head", 503, [])]


@pytest.mark.parametrize(("started", "until_close", "want"), [
    (False, False, [("lost",)]),  # before the head: the Attempt decides (a fresh connection, a retry, a 503)
    (True, True, [("finish",)]),  # a close-delimited body: the close is its end
    (True, False, [("abort", flags.UC)]),  # a body cut short
])  # fmt: skip
def test_a_lost_upstream(started, until_close, want) -> None:
    owner = Owner()
    relay, sink = _relay(owner)
    if started:
        relay.on_response_head(ResponseHead(200, [], None if until_close else 10, until_close))
        owner.calls.clear()
        sink.calls.clear()
    relay.on_upstream_lost(owner.conn)
    assert owner.calls == want
    assert sink.calls == ([("end",)] if until_close else [])


def test_interim_responses_and_unasked_switches() -> None:
    owner = Owner()
    relay, sink = _relay(owner)
    relay.on_response_head(ResponseHead(103, [], None))
    assert sink.calls == [("interim", 103)] and not relay.started
    relay.on_response_head(ResponseHead(101, [], None, upgrade=b"websocket"))  # no upgrade was asked for
    assert owner.calls == [("reply", 502, flags.UPE)]
