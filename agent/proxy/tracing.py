"""Trace context for one hop, pure: x-request-id, W3C traceparent/tracestate and B3.

The trace id of the incoming request is kept (W3C first, then B3); every hop gets a new span id, and the
incoming span becomes the parent. Malformed incoming headers start a new trace instead of failing.
"""

from __future__ import annotations

import random
import re
from binascii import hexlify as _hexlify
from collections.abc import Callable, Mapping

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_HEX = re.compile(r"^[0-9a-f]+$")
TRACE_HEADERS = frozenset({
    b"traceparent", b"tracestate", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled",
    b"b3",
})
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_SAMPLED, _NOT_SAMPLED = (b"x-b3-sampled", b"1"), (b"x-b3-sampled", b"0")
_PER_PERCENT = (1 << 32) / 100  # a sampling percentage against a 32-bit random draw


def _valid_hex(value: str | None, lengths: tuple[int, ...]) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    return value if len(value) in lengths and _HEX.match(value) and set(value) != {"0"} else None


def _sampled(sampling: float, bits: Callable[[int], int]) -> bool:
    """Whether a new trace is sampled, `sampling` percent of them (the listener's; Envoy's random_sampling)."""
    return sampling >= 100.0 or bits(32) < sampling * _PER_PERCENT


def outgoing_trace_headers(headers: Mapping[str, str], bits: Callable[[int], int] = random.getrandbits,
                           sampling: float = 100.0) -> list[tuple[bytes, bytes]]:
    """The trace headers to send upstream for a request with these (lower-case) headers; a new trace is sampled
    `sampling` percent of the time, an incoming one keeps its own decision."""
    if not headers:  # no incoming context (most requests): a new trace, without parsing or text formatting
        trace_b = _hexlify((bits(128) or 1).to_bytes(16, "big"))  # hex in C: no format spec to parse
        span = _hexlify((bits(64) or 1).to_bytes(8, "big"))
        sampled = _sampled(sampling, bits)
        return [(b"traceparent", b"".join((b"00-", trace_b, b"-", span, b"-01" if sampled else b"-00"))),
                (b"x-b3-traceid", trace_b), (b"x-b3-spanid", span), _SAMPLED if sampled else _NOT_SAMPLED]
    trace_id = parent = None
    sampled = "01"
    tracestate = None
    m = _TRACEPARENT.match(headers.get("traceparent", "").strip().lower())
    if m and m.group(1) != "ff" and m.group(2) != _ZERO_TRACE and m.group(3) != _ZERO_SPAN:
        trace_id, parent, sampled = m.group(2), m.group(3), m.group(4)
        tracestate = headers.get("tracestate")
    else:
        b3_trace = _valid_hex(headers.get("x-b3-traceid"), (16, 32))
        if b3_trace is not None:
            trace_id = b3_trace.rjust(32, "0")
            parent = _valid_hex(headers.get("x-b3-spanid"), (16,))
            sampled = "00" if headers.get("x-b3-sampled", "1").strip() in ("0", "false") else "01"
    if trace_id is None:
        sampled = "01" if _sampled(sampling, bits) else "00"
        trace_id = f"{bits(128):032x}"
        if trace_id == _ZERO_TRACE:
            trace_id = "0" * 31 + "1"
    span = f"{bits(64) or 1:016x}"
    out = [(b"traceparent", f"00-{trace_id}-{span}-{sampled}".encode())]
    if tracestate:
        out.append((b"tracestate", tracestate.encode("latin-1")))
    out += [(b"x-b3-traceid", trace_id.encode()), (b"x-b3-spanid", span.encode()),
            (b"x-b3-sampled", b"1" if int(sampled, 16) & 1 else b"0")]
    if parent is not None:
        out.append((b"x-b3-parentspanid", parent.encode()))
    return out
