"""Helpers shared by the xDS -> Snapshot translators: field allow-lists, durations, addresses, errors.

An Envoy field planemesh cannot honour is an error (the update is NACKed), never silently ignored:
each translator lists the fields it understands plus the few that are harmless to drop (stats names,
access logs...), and `only()` rejects everything else by name.
"""

from __future__ import annotations

import contextvars
import functools
import ipaddress
from collections.abc import Iterable, Mapping

from google.protobuf import json_format, message

from planemesh.model.config import ConfigError, TrafficDirection


class Errors:
    """Collects every error of one translation, so one NACK can name all of them."""

    def __init__(self) -> None:
        self.items: list[ConfigError] = []

    def add(self, err: ConfigError) -> None:
        self.items.append(err)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        first, rest = self.items[0], self.items[1:]
        reason = first.reason + "".join(f"; {e}" for e in rest)
        raise ConfigError(first.path, reason)


# Where translation notes the fields it accepts without effect (docs/istio-conformance.md lists them):
# a list of (path, reason) while a caller such as xds/conformance.py collects, else None (no cost).
_IGNORED: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar("ignored", default=None)


def collect_ignored() -> tuple[list[tuple[str, str]], contextvars.Token]:
    """Start collecting ignored fields in this context; pass the token to `stop_collecting`."""
    notes: list[tuple[str, str]] = []
    return notes, _IGNORED.set(notes)


def stop_collecting(token: contextvars.Token) -> None:
    _IGNORED.reset(token)


def note_ignored(path: str, reason: str) -> None:
    notes = _IGNORED.get()
    if notes is not None:
        notes.append((path, reason))


def only(msg: message.Message, allowed: Iterable[str], path: str, ignored: Mapping[str, str] | None = None) -> None:
    """Reject any set field outside `allowed` (an unsupported feature must be NACKed, not ignored), except
    the fields of `ignored` (name -> why dropping it is safe), which are accepted and noted."""
    allowed = set(allowed)
    for fd, _value in msg.ListFields():
        if fd.name in allowed:
            continue
        if ignored is not None and fd.name in ignored:
            note_ignored(f"{path}.{fd.name}", ignored[fd.name])
            continue
        raise ConfigError(f"{path}.{fd.name}", f"not supported by planemesh ({msg.DESCRIPTOR.name}.{fd.name})")


def seconds(duration: message.Message) -> float:
    return duration.seconds + duration.nanos / 1e9  # type: ignore[attr-defined]


def opt_seconds(parent: message.Message, field: str) -> float | None:
    return seconds(getattr(parent, field)) if parent.HasField(field) else None


def uint(parent: message.Message, field: str, default: int) -> int:
    """A google.protobuf.UInt32Value field's value, or the default when unset."""
    return getattr(parent, field).value if parent.HasField(field) else default


def fraction(pct: message.Message) -> float:
    """envoy.type.v3.FractionalPercent -> 0..1."""
    denominators = {0: 100, 1: 10_000, 2: 1_000_000}
    return min(1.0, pct.numerator / denominators.get(pct.denominator, 100))  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=65536)
def _canonical_ip(value: str) -> str | None:
    # ipaddress parsing dominated translating 10,000 endpoints; addresses repeat across updates.
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def parse_ip(value: str, path: str) -> str:
    ip = _canonical_ip(value)
    if ip is None:
        raise ConfigError(path, f"{value!r} is not an IP address (planemesh does not resolve names)")
    return ip


def socket_address(address: message.Message, path: str) -> tuple[str, int]:
    """envoy.config.core.v3.Address -> (ip, port). Only TCP socket addresses with a numeric port."""
    kind = address.WhichOneof("address")  # type: ignore[attr-defined]
    if kind != "socket_address":
        raise ConfigError(path, f"{kind or 'empty'} address is not supported (a TCP socket_address is needed)")
    sa = address.socket_address  # type: ignore[attr-defined]
    only(sa, {"address", "port_value", "protocol", "ipv4_compat"}, f"{path}.socket_address")
    if sa.protocol != 0:
        raise ConfigError(f"{path}.socket_address.protocol", "only TCP is supported")
    ip = parse_ip(sa.address, f"{path}.socket_address.address")
    if not 1 <= sa.port_value <= 65535:
        raise ConfigError(f"{path}.socket_address.port_value", f"{sa.port_value} is not a TCP port")
    return ip, sa.port_value


def planemesh_metadata(metadata: message.Message) -> dict:
    """filter_metadata["planemesh"] of an envoy.config.core.v3.Metadata, as a plain dict."""
    fm = metadata.filter_metadata  # type: ignore[attr-defined]
    return json_format.MessageToDict(fm["planemesh"]) if "planemesh" in fm else {}


def type_name(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


# Envoy's core.v3.TrafficDirection numbers
_DIRECTIONS = {0: TrafficDirection.UNSPECIFIED, 1: TrafficDirection.INBOUND, 2: TrafficDirection.OUTBOUND}


def traffic_direction(listener, path: str) -> TrafficDirection:
    """A Listener's traffic_direction (a plane's SLA mTLS mode leaves OUTBOUND chains as xDS says)."""
    direction = _DIRECTIONS.get(listener.traffic_direction)
    if direction is None:
        raise ConfigError(f"{path}.traffic_direction", f"{listener.traffic_direction}: expected INBOUND or OUTBOUND")
    return direction
