"""HTTP/2 abuse accounting for one downstream connection, without I/O: rapid reset (CVE-2023-44487), control-frame
floods, and the connection's response-buffer budget.

H2Downstream (h2_downstream.py) reports what it sees; a method returning a reason string means "past a limit:
GOAWAY with ENHANCE_YOUR_CALM and close". Every check is O(1) per frame. The limits and their defaults are Envoy's
(http2_protocol_options, overload.premature_reset_*), read from the plane's SLA; see docs/protocols.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planemesh.model.planes import SLA

# A client's PING + SETTINGS frames per second (ACKs the proxy must send). Envoy has no inbound rate of its own
# (its outbound-control-frame limit only catches a client that does not read); a client that reads its ACKs
# could otherwise keep a worker busy forever. gRPC keepalive and BDP pings stay far below this.
MAX_INBOUND_CONTROL_FRAMES_PER_S = 10_000
# What one read from an upstream socket may add to the response buffer before the proxy can pause it (reads take
# what the socket holds, commonly tens of KiB): the buffer budget is shared by at most budget / READ_RESERVE
# upstreams reading at once, so 1,000 streams cannot each bring one read past the budget.
READ_RESERVE = 64 * 1024


@dataclass(frozen=True, slots=True)
class H2Limits:
    max_concurrent_streams: int = 100  # Envoy: max_concurrent_streams (100 advised for untrusted downstreams)
    premature_reset_total: int = 500  # Envoy: overload.premature_reset_total_stream_count
    premature_reset_min_lifetime_s: float = 1.0  # Envoy: overload.premature_reset_min_stream_lifetime_seconds
    max_outbound_control_frames: int = 1000  # Envoy: max_outbound_control_frames
    max_consecutive_empty_frames: int = 1  # Envoy: max_consecutive_inbound_frames_with_empty_payload
    max_priority_per_stream: int = 100  # Envoy: max_inbound_priority_frames_per_stream
    max_window_update_per_data_sent: int = 10  # Envoy: max_inbound_window_update_frames_per_data_frame_sent
    max_control_frames_per_s: int = MAX_INBOUND_CONTROL_FRAMES_PER_S
    buffer_limit_bytes: int = 1 << 20  # Envoy: per_connection_buffer_limit_bytes

    @classmethod
    def from_sla(cls, sla: SLA) -> H2Limits:
        found = _BY_SLA.get(id(sla))
        if found is not None and found[0] is sla:
            return found[1]
        limits = cls(
            max_concurrent_streams=max(1, int(sla.h2_max_concurrent_streams)),
            premature_reset_total=max(2, int(sla.h2_premature_reset_total_stream_count)),
            premature_reset_min_lifetime_s=float(sla.h2_premature_reset_min_stream_lifetime_s),
            max_outbound_control_frames=max(1, int(sla.h2_max_outbound_control_frames)),
            max_consecutive_empty_frames=int(sla.h2_max_consecutive_inbound_frames_with_empty_payload),
            max_priority_per_stream=int(sla.h2_max_inbound_priority_frames_per_stream),
            max_window_update_per_data_sent=int(sla.h2_max_inbound_window_update_frames_per_data_frame_sent),
            buffer_limit_bytes=max(16384, int(sla.buffer_limit_bytes)),
        )
        if len(_BY_SLA) > 64:  # SLAs change with snapshots: keep the memo small
            _BY_SLA.clear()
        _BY_SLA[id(sla)] = (sla, limits)
        return limits


_BY_SLA: dict[int, tuple[SLA, H2Limits]] = {}

# Reasons (also the GOAWAY's debug data and the stats key suffix).
RAPID_RESET = "premature_resets"
OUTBOUND_CONTROL = "outbound_control_flood"
EMPTY_FRAMES = "inbound_empty_frames_flood"
PRIORITY = "inbound_priority_frames_flood"
WINDOW_UPDATE = "inbound_window_update_frames_flood"
CONTROL_RATE = "inbound_control_frames_rate"


class H2Guard:
    """Counters of one downstream connection. `clock` is monotonic seconds (the event loop's time)."""

    __slots__ = (
        "buffered",
        "clock",
        "closed_streams",
        "control_queued",
        "control_window",
        "control_window_start",
        "empty_run",
        "limits",
        "opened",
        "premature",
        "priority",
        "readers",
        "window_updates",
    )

    def __init__(self, limits: H2Limits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self.opened = 0  # streams the client opened
        self.closed_streams = 0  # streams that ended, however
        self.premature = 0  # of which reset by the client before a response began, young
        self.control_queued = 0  # ACKs etc. produced while the transport's buffer was not empty
        self.control_window = 0
        self.control_window_start = clock()
        self.empty_run = 0
        self.priority = 0
        self.window_updates = 0
        self.buffered = 0  # response bytes read from upstreams, not yet sent to the client
        self.readers = 0  # upstreams being read for this connection (each may bring READ_RESERVE at once)

    # ---- streams ----------------------------------------------------------------------------------

    def may_open(self, active: int) -> bool:
        """A new stream while `active` are in progress: False means refuse it (REFUSED_STREAM)."""
        return active < self.limits.max_concurrent_streams

    def stream_opened(self) -> None:
        self.opened += 1

    def stream_closed(self, started: float, responded: bool, reset_by_client: bool) -> str | None:
        """A stream ended. Premature: reset by the client, before any response, within the minimum lifetime.
        Envoy's rule: close once premature resets reach half the total-count limit, or, past that many closed
        streams, half of them. A client cancelling a minority of its streams is never closed."""
        self.closed_streams += 1
        if not reset_by_client or responded:
            return None
        if self.clock() - started > self.limits.premature_reset_min_lifetime_s:
            return None
        self.premature += 1
        limit = self.limits.premature_reset_total
        if self.closed_streams < limit:
            if self.premature * 2 < limit:
                return None
        elif self.premature * 2 < self.closed_streams:
            return None
        return RAPID_RESET

    # ---- inbound frames -----------------------------------------------------------------------------

    def payload_frame(self, empty: bool) -> str | None:
        """A DATA/HEADERS/CONTINUATION frame; empty: no payload and no END_STREAM."""
        if not empty:
            self.empty_run = 0
            return None
        self.empty_run += 1
        return EMPTY_FRAMES if self.empty_run > self.limits.max_consecutive_empty_frames else None

    def priority_frame(self) -> str | None:
        self.priority += 1
        return PRIORITY if self.priority > self.limits.max_priority_per_stream * (1 + self.opened) else None

    def window_update_frame(self, data_frames_sent: int) -> str | None:
        self.window_updates += 1
        allowed = 5 + 2 * (self.opened + self.limits.max_window_update_per_data_sent * data_frames_sent)
        return WINDOW_UPDATE if self.window_updates > allowed else None

    def control_frame(self, write_pending: bool) -> str | None:
        """A PING or SETTINGS (each answered with an ACK), or a refused stream (answered with RST_STREAM).
        write_pending: the transport still holds unsent bytes (the client is not reading)."""
        if write_pending:
            self.control_queued += 1
            if self.control_queued > self.limits.max_outbound_control_frames:
                return OUTBOUND_CONTROL
        self.control_window += 1
        if self.control_window > self.limits.max_control_frames_per_s:
            now = self.clock()
            if now - self.control_window_start < 1.0:
                return CONTROL_RATE
            self.control_window = 1
            self.control_window_start = now
        return None

    def write_drained(self) -> None:
        """The transport's buffer is empty: nothing queued any more."""
        self.control_queued = 0

    # ---- buffered response bytes ----------------------------------------------------------------------

    def over_budget(self) -> bool:
        return self.buffered >= self.limits.buffer_limit_bytes

    def may_read(self) -> bool:
        """One more upstream may be read: the budget holds what is buffered plus a read from each reader (one
        reader at least, whatever the budget, while it is not full)."""
        limit = self.limits.buffer_limit_bytes
        if self.buffered >= limit:
            return False
        return not self.readers or self.buffered + (self.readers + 1) * READ_RESERVE <= limit
