"""HCM http2_protocol_options -> the planes' HTTP/2 abuse limits (agent/proxy/h2_guard.py)."""

from __future__ import annotations

from planemesh.model.config import ConfigError

# field -> (SLA field, least valid value, as Envoy validates it). Other fields of the message are accepted and
# not applied.
_H2_LIMITS = {
    "max_concurrent_streams": ("h2_max_concurrent_streams", 1),
    "max_outbound_control_frames": ("h2_max_outbound_control_frames", 1),
    "max_consecutive_inbound_frames_with_empty_payload": ("h2_max_consecutive_inbound_frames_with_empty_payload", 0),
    "max_inbound_priority_frames_per_stream": ("h2_max_inbound_priority_frames_per_stream", 0),
    "max_inbound_window_update_frames_per_data_frame_sent": (
        "h2_max_inbound_window_update_frames_per_data_frame_sent",
        1,
    ),
}


def http2_limits(opts, path: str) -> list[tuple[str, int, str]]:
    """(SLA field, value, config path) for each limit the options set; ConfigError below Envoy's minimum."""
    out = []
    for name, (key, least) in _H2_LIMITS.items():
        if opts.HasField(name):
            value = getattr(opts, name).value
            if value < least:
                raise ConfigError(f"{path}.{name}", f"must be at least {least}")
            out.append((key, value, f"{path}.{name}"))
    return out
