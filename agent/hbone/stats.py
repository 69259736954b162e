"""HBONE counters (one set per node process): node totals plus the same per peer node and direction.

`as_dict()` is what the node writes to its `--stats` file; the agent reads that file and hands `rows()`'s shape
(agent/metrics.py HboneStats rows) to its admin `/stats` and Prometheus metrics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

UNKNOWN_PEER = "-"  # a refusal before any peer is known (no route for the destination)


@dataclass
class PeerCounters:
    """One peer node, one direction (outbound: we are the source node; inbound: the destination node)."""

    connections: int = 0  # mTLS h2 connections established
    streams: int = 0  # CONNECT tunnels answered 200
    bytes_sent: int = 0  # tunnel payload this node sent to the peer (counted when a tunnel closes)
    bytes_received: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # reason -> count


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
    # per peer node name (inbound: the peer whose address the connection came from, else that address)
    peers_in: dict[str, PeerCounters] = field(default_factory=dict)
    peers_out: dict[str, PeerCounters] = field(default_factory=dict)
    # WDS (agent/hbone/wds.py): responses ACKed / NACKed
    wds_acks: int = 0
    wds_nacks: int = 0

    def peer_in(self, peer: str) -> PeerCounters:
        return self.peers_in.setdefault(peer, PeerCounters())

    def peer_out(self, peer: str) -> PeerCounters:
        return self.peers_out.setdefault(peer, PeerCounters())

    def refuse_in(self, reason: str, peer: str = UNKNOWN_PEER) -> None:
        self.refused_in[reason] = self.refused_in.get(reason, 0) + 1
        refused = self.peer_in(peer).refused
        refused[reason] = refused.get(reason, 0) + 1

    def refuse_out(self, reason: str, peer: str = UNKNOWN_PEER) -> None:
        self.refused_out[reason] = self.refused_out.get(reason, 0) + 1
        refused = self.peer_out(peer).refused
        refused[reason] = refused.get(reason, 0) + 1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def peer_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """A stats file's content (as_dict) -> agent/metrics.py HbonePeerStats rows, one per peer and direction."""
    rows = []
    for direction in ("inbound", "outbound"):
        peers = stats.get("peers_in" if direction == "inbound" else "peers_out") or {}
        for peer, c in sorted(peers.items()):
            rows.append({"peer": peer, "direction": direction, **{k: c[k] for k in PEER_FIELDS if k in c}})
    return rows


PEER_FIELDS = ("connections", "streams", "bytes_sent", "bytes_received", "refused")
