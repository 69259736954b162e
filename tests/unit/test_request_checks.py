"""The HTTP/1 request-head checks (agent/proxy/request_checks.py) and the hop-by-hop set, as pure functions."""

from __future__ import annotations

import pytest

from planemesh.agent.proxy.http1 import HOP_BY_HOP, dropped_names, status_line
from planemesh.agent.proxy.request_checks import split_absolute, valid_host


@pytest.mark.parametrize(("target", "expected"), [
    (b"http://a.example/x?y=1", (b"a.example", b"/x?y=1")),
    (b"HTTPS://A.example:8443", (b"A.example:8443", b"/")),
    (b"http://a.example?q", (b"a.example", b"/?q")),
    (b"http://[::1]:80/p", (b"[::1]:80", b"/p")),
    (b"http:///nohost", (b"", b"/nohost")),
    (b"/origin", None),
    (b"*", None),
    (b"ftp://a/b", None),
    (b"a.example:80", None),
])
def test_split_absolute(target: bytes, expected) -> None:
    assert split_absolute(target) == expected


@pytest.mark.parametrize(("host", "ok"), [
    (b"a.example", True), (b"a.example:8080", True), (b"127.0.0.1", True), (b"[::1]", True), (b"[::1]:80", True),
    (b"", True), (b"a_b-c~d", True),
    (b"a b", False), (b"a/b", False), (b"a@b", False), (b"a:b", False), (b"a:1:2", False), (b"[::1", False),
    (b"a\tb", False), (b"a:123456", False),
])
def test_valid_host(host: bytes, ok: bool) -> None:
    assert valid_host(host) is ok
    assert valid_host(host) is ok  # memoised answers agree


def test_connection_cannot_make_host_hop_by_hop() -> None:
    assert dropped_names([b"close, host, keep-alive"]) is HOP_BY_HOP
    assert dropped_names([b"x-a, Host"]) == HOP_BY_HOP | {b"x-a"}


def test_status_line_for_http10_clients() -> None:
    assert status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert status_line(200, None, True) == b"HTTP/1.0 200 OK\r\n"
    assert status_line(200) == b"HTTP/1.1 200 OK\r\n"  # the cache keeps the 1.1 line
