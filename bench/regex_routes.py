"""Cost of route regexes: RE2 (what planemesh compiles configuration regexes with, model/safe_regex.py) against
Python's backtracking `re`, in process, no network:

    python -m bench regex_routes [--routes N] [--requests N]

1. route selection in a virtual host of N safe_regex routes where only the last one matches (every request
   tries them all), for patterns with a literal prefix (`/svcI/v[0-9]+/...`: RE2's match-range bounds refuse
   most routes without calling RE2) and without one (`/api/v[0-9]+/svcI/...`): microseconds per request;
2. the catastrophic pattern of issue 11 (`(a+)+$`) against `a`*n + `b`: RE2 at n = 30 and 10,000, Python's re
   at n = 16..22 (each `a` doubles its time; at 26 it took 3 s).
"""

from __future__ import annotations

import argparse
import re
import time

from planemesh.agent.proxy import routing
from planemesh.model.config import Route, RouteMatch, VirtualHost
from planemesh.model.safe_regex import compile_regex


class _BacktrackingRegex:
    """Python's re behind the same interface, for comparison only."""

    def __init__(self, pattern: str) -> None:
        self._re = re.compile(pattern)

    def fullmatch(self, text: str) -> bool:
        return self._re.fullmatch(text) is not None


SHAPES = {
    "literal prefix": ("/svc{i}/v[0-9]+/[a-z0-9-]+(/[0-9]+)?", "/svc{i}/v2/orders-7/42"),
    "no literal prefix": ("/api/v[0-9]+/svc{i}/[a-z0-9-]+(/[0-9]+)?", "/api/v2/svc{i}/orders-7/42"),
}


def _select_us(routes: int, requests: int, engine, shape: tuple[str, str]) -> float:
    saved = routing.compile_regex
    routing.compile_regex = engine
    try:
        vh = routing.CompiledVirtualHost(VirtualHost(name="v", domains=("*",), routes=tuple(
            Route(name=f"r{i}", match=RouteMatch(prefix=None, regex=shape[0].format(i=i)))
            for i in range(routes)
        )))  # fmt: skip
    finally:
        routing.compile_regex = saved
    path = shape[1].format(i=routes - 1)
    assert vh.select(path, "", dict).name == f"r{routes - 1}"
    t0 = time.perf_counter()
    for _ in range(requests):
        vh.select(path, "", dict)
    return (time.perf_counter() - t0) / requests * 1e6


def _match_ms(regex, n: int) -> float:
    t0 = time.perf_counter()
    assert not regex.fullmatch("a" * n + "b")
    return (time.perf_counter() - t0) * 1000


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench regex_routes")
    ap.add_argument("--routes", type=int, default=100)
    ap.add_argument("--requests", type=int, default=20000)
    args = ap.parse_args(argv)
    for shape, patterns in SHAPES.items():
        for name, engine in (("RE2 (planemesh)", compile_regex), ("Python re", _BacktrackingRegex)):
            cost = _select_us(args.routes, args.requests, engine, patterns)
            print(f"{name:16} {args.routes} regex routes ({shape}), the last matches: {cost:7.1f} us/request")
    re2_bad = compile_regex("(a+)+$")
    for n in (30, 10_000):
        print(f"RE2 (a+)+$ on {n} a's + b: {_match_ms(re2_bad, n):.3f} ms")
    py_bad = _BacktrackingRegex("(a+)+$")
    for n in (16, 18, 20, 22):
        print(f"Python re (a+)+$ on {n} a's + b: {_match_ms(py_bad, n):.1f} ms")
