"""Regexes that come from configuration, compiled with RE2 as Envoy's `safe_regex` is.

Python's `re` backtracks: `(a+)+$` against 30 `a`s and a `b` takes minutes, in the worker that serves a whole
plane. RE2 runs in time linear in the input and refuses what it cannot do that way (backreferences,
lookaround); such patterns are NACKed with the field that holds them, as Envoy does. A match is always a
full match of the value (Envoy's safe_regex semantics). Snapshots keep the pattern text; each worker compiles
it once when it builds its routing table (agent/proxy/routing.py), never per request.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from planemesh.model.config import ConfigError

# Envoy refuses a regex whose compiled program is bigger than `re2.max_program_size.error_level`, default 100.
# Only patterns written in the configuration are held to it: the matchers planemesh builds itself
# (suffix, contains: `.*` + an escaped literal) grow with their literal, as Envoy's non-regex matchers do.
MAX_PROGRAM_SIZE = 100

_RANGE_LEN = 32  # bytes of the match-range bounds RE2 computes once per pattern


@functools.cache
def _re2() -> Any:
    """google-re2, loaded on the first regex: RE2 and the C++ runtime it maps cost a worker ~3 MB RSS, and most
    planes have no regex route (bench/footprint.py)."""
    return importlib.import_module("re2")


@functools.cache
def _options() -> Any:
    options = _re2().Options()
    options.log_errors = False  # a refused pattern is a ConfigError, not a line on stderr
    options.never_capture = True  # only "does the whole value match" is asked: no submatch engine needed
    return options


class Regex:
    """A compiled RE2 full-match test. It calls RE2's Match directly: google-re2's Python-level fullmatch()
    builds a match object with character offsets, about 10x the cost of the match itself."""

    __slots__ = ("_hi", "_lo", "_re", "_whole", "pattern", "programsize")

    def __init__(self, pattern: str, compiled: Any) -> None:
        self.pattern = pattern
        self._re = compiled._regexp
        self.programsize = compiled.programsize
        self._whole = _re2()._re2.RE2.Anchor.ANCHOR_BOTH
        # RE2's bounds on every string the pattern matches (lo <= s <= hi): a request outside them is refused
        # by two byte comparisons, without the call into RE2 (a route with a literal prefix, most of them).
        try:
            self._lo, hi = compiled.possiblematchrange(_RANGE_LEN)
            self._hi: bytes | None = hi
        except _re2().error:  # no finite bounds (e.g. a leading `.*` over any byte)
            self._lo, self._hi = b"", None

    def fullmatch(self, text: str) -> bool:
        """Whether `text` as a whole matches (Envoy's safe_regex semantics), in time linear in its length."""
        data = text.encode("utf-8", "surrogatepass")
        if data < self._lo or (self._hi is not None and data > self._hi):
            return False
        return self._re.Match(self._whole, data, 0, len(data))[0][0] >= 0

    def __reduce__(self):  # pickled (a snapshot's compiled form, if ever) as its pattern, compiled again
        return compile_regex, (self.pattern,)

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"


def compile_regex(pattern: str, path: str = "", *, max_program_size: int | None = None) -> Regex:
    """RE2-compile `pattern`; ConfigError naming `path` when RE2 refuses it or it is too big."""
    re2 = _re2()
    try:
        compiled = Regex(pattern, re2.compile(pattern, _options()))
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ConfigError(path, f"invalid regex {pattern!r} (RE2: {reason})") from None
    except (TypeError, ValueError) as exc:  # e.g. a NUL byte or a surrogate the UTF-8 encoding refuses
        raise ConfigError(path, f"invalid regex {pattern!r}: {exc}") from None
    if max_program_size is not None and compiled.programsize > max_program_size:
        raise ConfigError(
            path, f"regex {pattern!r} is too complex (RE2 program size {compiled.programsize} > {max_program_size})"
        )
    return compiled


def check_config_regex(pattern: str, path: str) -> str:
    """Validate a safe_regex from configuration (RE2 syntax, Envoy's program-size limit); returns it."""
    compile_regex(pattern, path, max_program_size=MAX_PROGRAM_SIZE)
    return pattern


def literal(text: str) -> str:
    """An RE2 pattern that matches `text` literally."""
    return _re2().escape(text)
