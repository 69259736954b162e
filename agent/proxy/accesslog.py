"""Access log: one line per request in Envoy's default text format (or JSON), buffered.

The hot path only appends the finished exchange to a list; lines are formatted and written in batches
(on a timer or when the batch is full), so a request costs no logging syscall.
Envoy's default format, plus the plane name:
[START] "METHOD PATH PROTOCOL" CODE FLAGS BYTES_RX BYTES_TX DURATION UPSTREAM_TIME "XFF" "UA" "REQUEST_ID"
"AUTHORITY" "UPSTREAM_HOST" PLANE ["PEER_IDENTITY"]
The last field is the client certificate's SPIFFE ID, on TLS connections that presented one (agent/proxy/tls.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from planemesh.agent.lazy_modules import load

# Response flags (Envoy's short names).
UF = "UF"  # upstream connection failure
UT = "UT"  # upstream request timeout
UC = "UC"  # upstream connection termination
URX = "URX"  # retries exhausted / upstream retry limit
DC = "DC"  # downstream connection termination
NR = "NR"  # no route
NC = "NC"  # no cluster: the route names a cluster the configuration does not have (yet)
UO = "UO"  # upstream overflow (circuit breaking / overload)
RL = "RL"  # rate limited locally
UPE = "UPE"  # upstream protocol error
DPE = "DPE"  # downstream protocol error
OM = "OM"  # overload manager: shed by the worker's memory pressure (agent/proxy/overload.py)


@dataclass(slots=True)
class AccessRecord:
    start_time: float
    method: str
    path: str
    protocol: str
    status: int
    flags: str
    bytes_rx: int
    bytes_tx: int
    duration_ms: int
    upstream_ms: int | None
    xff: str | None
    user_agent: str | None
    request_id: str | None
    authority: str | None
    upstream_host: str | None
    plane: str
    ds: object = None  # the client connection (its TLS peer identity is read when the line is formatted)
    peer: str | None = None  # a same-node client pod's SPIFFE ID (the pod table), shown as its peer identity


_last_second: list = [-1, ""]  # strftime is slow: lines of the same second share the prefix
# A format spec per line costs more than a list index. Filled by the first line: ~64 kB of RSS that a worker
# without an access log, or at rest, does not hold (docs/benchmarks.md, "Lean 5").
_MILLIS: list[str] = []


def format_start_time(epoch: float) -> str:
    secs = int(epoch)
    cached = _last_second
    if cached[0] != secs:  # once a second: the per-line path stays one list index
        cached[0], cached[1] = secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        if not _MILLIS:
            _MILLIS.extend(f".{ms:03d}Z" for ms in range(1000))
    return cached[1] + _MILLIS[int((epoch - secs) * 1000)]


def _q(value: str | None) -> str:
    """A quoted field: Envoy prints '-' for absent values; quotes and control bytes are escaped."""
    if not value:
        return '"-"'
    if value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def peer_identity(rec: object) -> str | None:
    """The SPIFFE ID of the record's client (kept on the connection's SSLObject by agent/proxy/tls.py; a line
    shows AccessRecord.peer before it: a same-node client pod's ID from the pod table)."""
    transport = getattr(getattr(rec, "ds", None), "transport", None)
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:  # plaintext (most lines): getattr(None, ...) would raise and catch an AttributeError
        return None
    return getattr(ssl_object, "planemesh_peer", None)


def format_text(rec: AccessRecord) -> str:
    upstream = rec.upstream_ms
    peer = getattr(rec, "peer", None) or peer_identity(rec)  # TcpRecord (tcp_tls.py) has none
    line = f"{rec.method} {rec.path} {rec.protocol}"
    xff, ua, rid, authority, host = rec.xff, rec.user_agent, rec.request_id, rec.authority, rec.upstream_host
    plain = f"{line}{xff}{ua}{rid}{authority}{host}{peer}"
    if plain.isprintable() and '"' not in plain and "\\" not in plain:  # nothing to escape: no _q per field
        return (
            f"[{format_start_time(rec.start_time)}] \"{line}\" {rec.status} {rec.flags or '-'} "
            f"{rec.bytes_rx} {rec.bytes_tx} {rec.duration_ms} {'-' if upstream is None else upstream}"
            f" \"{xff or '-'}\" \"{ua or '-'}\" \"{rid or '-'}\" \"{authority or '-'}\" \"{host or '-'}\" "
            f"{rec.plane}{'' if peer is None else ' ' + _q(peer)}\n"
        )
    q = _q
    return (
        f"[{format_start_time(rec.start_time)}] {q(line)} {rec.status} "
        f"{rec.flags or '-'} {rec.bytes_rx} {rec.bytes_tx} {rec.duration_ms} {'-' if upstream is None else upstream} "
        f"{q(xff)} {q(ua)} {q(rid)} {q(authority)} {q(host)} "
        f"{rec.plane}{'' if peer is None else ' ' + q(peer)}\n"
    )


def format_json(rec: AccessRecord) -> str:
    return (
        load("json").dumps(  # json (~0.1 MB of RSS) only in a worker whose log format is json
            {
                "start_time": format_start_time(rec.start_time),
                "method": rec.method,
                "path": rec.path,
                "protocol": rec.protocol,
                "response_code": rec.status,
                "response_flags": rec.flags or "-",
                "bytes_received": rec.bytes_rx,
                "bytes_sent": rec.bytes_tx,
                "duration": rec.duration_ms,
                "upstream_service_time": rec.upstream_ms,
                "x_forwarded_for": rec.xff,
                "user_agent": rec.user_agent,
                "request_id": rec.request_id,
                "authority": rec.authority,
                "upstream_host": rec.upstream_host,
                "plane": rec.plane,
                "peer_identity": getattr(rec, "peer", None) or peer_identity(rec),
            },
            separators=(",", ":"),
        )
        + "\n"
    )


Sink = Callable[[str], None]


def file_sink(path: str) -> Sink:
    """Append batches to a file with one write() each (O_APPEND keeps concurrent workers' lines whole)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    def write(text: str) -> None:
        os.write(fd, text.encode("utf-8", "backslashreplace"))

    return write


class AccessLogBuffer:
    """Collects finished records; `flush()` formats and hands one batch to the sink."""

    __slots__ = ("_formatter", "_pending", "_sink", "enabled", "max_pending")

    def __init__(self, sink: Sink | None, formatter: Callable[[AccessRecord], str] = format_text,
                 max_pending: int = 1024) -> None:
        self._sink = sink
        self.enabled = sink is not None  # records are kept at all (a request builds its record only then)
        self._formatter = formatter
        self._pending: list[AccessRecord] = []
        self.max_pending = max_pending

    def append(self, rec: AccessRecord) -> None:
        if self._sink is None:
            return
        self._pending.append(rec)
        if len(self._pending) >= self.max_pending:
            self.flush()

    def flush(self) -> None:
        if not self._pending or self._sink is None:
            return
        batch, self._pending = self._pending, []
        fmt = self._formatter
        try:
            self._sink("".join(map(fmt, batch)))
        except OSError:
            pass  # a full disk must not take the data path down; the counters still count
