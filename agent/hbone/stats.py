"""HBONE counters (one set per node process), in the shape /stats and the metrics code read elsewhere."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class HboneStats:
    # inbound (destination node)
    connections_in: int = 0
    peer_refused: int = 0  # verified chain, but not exactly one SPIFFE URI SAN
    tunnels_in: int = 0
    refused_in: dict[str, int] = field(default_factory=dict)  # reason -> count (bad_request, rbac_denied, ...)
    dial_failed: int = 0
    # outbound (source node)
    captured: int = 0
    tunnels_out: int = 0
    refused_out: dict[str, int] = field(default_factory=dict)  # no_route, unknown_source, connect_failed, status_N
    connections_out: int = 0
    bytes_up: int = 0  # source pod -> destination pod, counted when a tunnel closes (each side counts its own)
    bytes_down: int = 0

    def refuse_in(self, reason: str) -> None:
        self.refused_in[reason] = self.refused_in.get(reason, 0) + 1

    def refuse_out(self, reason: str) -> None:
        self.refused_out[reason] = self.refused_out.get(reason, 0) + 1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
