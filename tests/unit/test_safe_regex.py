"""Regexes from configuration are RE2 (Envoy's safe_regex): linear time, full match, refused when RE2 cannot do
them, with the resource and field named (issue 11, finding 4)."""

from __future__ import annotations

import pickle

import pytest

from planemesh.agent.proxy.routing import CompiledHeaderMatch, CompiledQueryMatch, CompiledRoute, CompiledVirtualHost
from planemesh.model.config import (
    ConfigError,
    HeaderMatch,
    QueryMatch,
    Route,
    RouteAction,
    RouteMatch,
    VirtualHost,
)
from planemesh.model.safe_regex import MAX_PROGRAM_SIZE, check_config_regex, compile_regex, literal
from planemesh.xds.translate import translate
from tests.unit.test_xds_translate import PASS, PLANES, http_listener, routes, to_resources

CATASTROPHIC = "/(a+)+$"  # exponential for a backtracking engine on "/aaa...ab"
EVIL = "/" + "a" * 30 + "b"


# The whole test is bounded: on a backtracking engine this pattern and input take minutes (doubling per `a`).
@pytest.mark.timeout(60)
def test_catastrophic_pattern_is_linear_and_a_full_match() -> None:
    route = CompiledRoute(Route(match=RouteMatch(prefix=None, regex=CATASTROPHIC), action=RouteAction()))
    no_headers = dict
    assert not route.matches(EVIL, "", no_headers)
    assert route.matches("/" + "a" * 30, "", no_headers)
    hdr = CompiledHeaderMatch(HeaderMatch(name="x-a", regex="(a+)+$"))
    assert not hdr.matches({"x-a": "a" * 30 + "b"})
    assert hdr.matches({"x-a": "a" * 30})
    query = CompiledQueryMatch(QueryMatch(name="q", regex="(a+)+$"))
    assert not query.matches({"q": "a" * 30 + "b"})
    assert query.matches({"q": "a" * 30})


def test_safe_regex_is_a_whole_string_match() -> None:
    vh = CompiledVirtualHost(VirtualHost(name="v", domains=("*",), routes=(
        Route(name="items", match=RouteMatch(prefix=None, regex=r"/items/\d+")),
        Route(name="root", match=RouteMatch(prefix="/")),
    )))  # fmt: skip
    assert vh.select("/items/42", "", dict).name == "items"
    assert vh.select("/items/42x", "", dict).name == "root"  # not a prefix match
    assert vh.select("/x/items/42", "", dict).name == "root"  # not a search


def test_literal_matchers_escape_for_re2() -> None:
    for text in ("a.b", "a b#~/-", "(x)*+?[]{}|^$\\", "é\x00\t"):
        pattern = ".*" + literal(text)
        assert compile_regex(pattern).fullmatch("zz" + text)
        assert not compile_regex(pattern).fullmatch("zz" + text + "!")


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"(a)\1", "invalid escape"),  # backreference
        ("(?=a)a", "invalid perl operator"),  # lookahead
        ("(?<=a)b", "invalid perl operator"),  # lookbehind
        ("(?!a)b", "invalid perl operator"),
        ("([", "missing"),
        ("a{1000}", "too complex"),  # Envoy's re2.max_program_size.error_level
    ],
)
def test_patterns_re2_refuses_are_config_errors(pattern: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_config_regex(pattern, "route_config[r].x")
    assert err.value.path == "route_config[r].x" and reason in str(err.value)


def test_program_size_limit_is_envoys_default() -> None:
    assert MAX_PROGRAM_SIZE == 100
    check_config_regex("/api/v[0-9]+/users/[a-z0-9-]+/orders(/[0-9]+)?", "p")  # a realistic route fits


@pytest.mark.parametrize(
    ("match", "field"),
    [
        ({"safe_regex": {"regex": r"/(a)\1"}}, "routes[0].match.safe_regex"),
        ({"prefix": "/", "headers": [{"name": "x", "safe_regex_match": {"regex": "(?=a)"}}]},
         "routes[0].match.headers[0].safe_regex_match"),
        ({"prefix": "/", "headers": [{"name": "x", "string_match": {"safe_regex": {"regex": "(?<!a)b"}}}]},
         "routes[0].match.headers[0].string_match.safe_regex"),
        ({"prefix": "/", "query_parameters": [{"name": "q", "string_match": {"safe_regex": {"regex": r"(b)\1"}}}]},
         "routes[0].match.query_parameters[0].string_match.safe_regex"),
    ],
)
def test_translation_nacks_naming_resource_and_field(match: dict, field: str) -> None:
    docs = [http_listener(rds="r1"), routes(match=match, route={"cluster": "pass"}), PASS]
    with pytest.raises(ConfigError) as err:
        translate(to_resources(docs), PLANES)
    assert f"route_config[r1].virtual_hosts[0].{field}" in str(err.value), str(err.value)
    assert "RE2" in str(err.value)


def test_translated_regexes_travel_to_workers_as_text() -> None:
    """The snapshot a worker receives is pickled: it holds pattern text, each worker compiles it once."""
    match = {"safe_regex": {"regex": "/(a+)+$"},
             "headers": [{"name": "x", "suffix_match": ".v1"}, {"name": "y", "contains_match": "(z)"}]}
    snap = translate(to_resources([http_listener(rds="r1"), routes(match=match, route={"cluster": "pass"}), PASS]),
                     PLANES)
    snap2 = pickle.loads(pickle.dumps(snap))
    route = snap2.route_config("r1").virtual_hosts[0].routes[0]
    compiled = CompiledRoute(route)
    assert compiled.matches("/aaaa", "", lambda: {"x": "a.v1", "y": "x(z)y"})
    assert not compiled.matches("/aaaa", "", lambda: {"x": "a-v1", "y": "x(z)y"})  # the dot is literal
    assert not compiled.matches(EVIL, "", lambda: {"x": "a.v1", "y": "x(z)y"})


@pytest.mark.parametrize(
    "pattern",
    ["/svc1/v[0-9]+/[a-z0-9-]+(/[0-9]+)?", r".*\.v1", "(a+)+$", "", "[^/]*", "/x/.*", "(?i)/AbC.*", "é+x",
     r"[\x{100}-\x{10ffff}]+", "a|b|/zz"],
)
def test_match_range_prefilter_agrees_with_re2(pattern: str) -> None:
    """The byte-range shortcut in Regex.fullmatch never changes an answer of RE2 itself."""
    import itertools

    import re2

    raw = re2.compile(pattern)
    compiled = compile_regex(pattern)
    alphabet = ["/", "a", "b", "x", "/svc1/v", "9", "-", ".v1", "é", "\u0100", "\U0010ffff", "\x00", "\xff", "AbC",
                "abc", "/x/", "zz"]
    for n in range(4):
        for parts in itertools.product(alphabet, repeat=n):
            text = "".join(parts)
            assert compiled.fullmatch(text) == (raw.fullmatch(text) is not None), (pattern, text)
