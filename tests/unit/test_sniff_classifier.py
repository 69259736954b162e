"""The sniff classifier on real first bytes: table-driven, plus truncation and fuzzing (never raises)."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planemesh.agent.proxy.sniff import H2_PREFACE, MAX_PEEK, Kind, classify, parse_client_hello


def client_hello(sni: str | None, alpn: list[str] | None) -> bytes:
    """The bytes a real TLS client (CPython's OpenSSL) sends first."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


HELLO = client_hello("api.example.test", ["h2", "http/1.1"])

CASES = [
    # (description, bytes, final, expected kind or None for "undecided")
    ("empty, waiting", b"", False, None),
    ("empty at timeout: server-first", b"", True, Kind.OPAQUE),
    ("GET request line", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", False, Kind.HTTP1),
    ("HTTP/1.0 POST", b"POST /x?y=1 HTTP/1.0\r\n", False, Kind.HTTP1),
    ("bare LF line end", b"GET / HTTP/1.1\n", False, Kind.HTTP1),
    ("method prefix only", b"GE", False, None),
    ("method prefix at timeout", b"GE", True, Kind.OPAQUE),
    ("request line incomplete", b"GET /long/path", False, None),
    ("request line incomplete at timeout", b"GET /long/path", True, Kind.OPAQUE),
    ("unknown method", b"FOO / HTTP/1.1\r\n", False, Kind.OPAQUE),
    ("lowercase method", b"get / HTTP/1.1\r\n", False, Kind.OPAQUE),
    ("HTTP/2 in a request line is not HTTP/1", b"GET / HTTP/2.0\r\n", False, Kind.OPAQUE),
    ("h2 preface", H2_PREFACE, False, Kind.H2),
    ("h2 preface and SETTINGS", H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", False, Kind.H2),
    ("h2 preface partial", H2_PREFACE[:10], False, None),
    ("h2 preface partial at timeout", H2_PREFACE[:10], True, Kind.OPAQUE),
    ("TLS ClientHello", HELLO, False, Kind.TLS),
    ("TLS record header only", HELLO[:5], False, None),
    ("TLS half a record", HELLO[: len(HELLO) // 2], False, None),
    ("TLS half a record at timeout", HELLO[: len(HELLO) // 2], True, Kind.OPAQUE),
    ("TLS alert record is not a hello", b"\x15\x03\x03\x00\x02\x02\x28", False, Kind.OPAQUE),
    ("TLS 0x16 with a bad version", b"\x16\x09\x01\x00\x10\x01", False, Kind.OPAQUE),
    ("SSH banner (client side)", b"SSH-2.0-OpenSSH_9.6\r\n", False, Kind.OPAQUE),
    ("binary", bytes(range(256)), False, Kind.OPAQUE),
    ("MySQL-ish handshake response", b"\x20\x00\x00\x01\x85\xa6\x03\x00", False, Kind.OPAQUE),
]


@pytest.mark.parametrize(("data", "final", "kind"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classify_table(data: bytes, final: bool, kind: Kind | None) -> None:
    verdict = classify(data, final=final)
    assert (verdict.kind if verdict else None) == kind


def test_tls_sni_and_alpn_are_read() -> None:
    verdict = classify(HELLO)
    assert verdict is not None and verdict.kind is Kind.TLS
    assert verdict.sni == "api.example.test"
    assert verdict.alpn == ("h2", "http/1.1")


def test_tls_without_sni_or_alpn() -> None:
    verdict = classify(client_hello(None, None))
    assert verdict is not None and verdict.kind is Kind.TLS
    assert (verdict.sni, verdict.alpn) == (None, ())


def test_http1_never_waits_beyond_the_request_line_limit() -> None:
    data = b"GET /" + b"a" * (MAX_PEEK + 10)
    assert classify(data) == classify(data, final=True)
    assert classify(data).kind is Kind.OPAQUE  # type: ignore[union-attr]


def test_truncated_client_hellos_never_raise() -> None:
    body = HELLO[5:]
    for cut in range(len(body)):
        sni, alpn = parse_client_hello(body[:cut])
        assert sni in (None, "api.example.test")
        assert all(isinstance(p, str) for p in alpn)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_garbage_never_raises(data: bytes, final: bool) -> None:
    verdict = classify(data, final=final)
    assert verdict is not None or not final


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(min_value=6, max_value=400))
def test_mutated_client_hello_never_raises(noise: bytes, at: int) -> None:
    mutated = HELLO[:at] + noise + HELLO[at + len(noise) :]
    verdict = classify(mutated, final=True)
    assert verdict is not None
