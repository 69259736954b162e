"""HBONE rows of the agent's stats report and their Prometheus families (agent/metrics.py calls these).

Rows come from agent/hbone/supervisor.py's provider (the HBONE node's counters file), one per peer node and
direction (outbound: this node is the source; inbound: the destination), and one for the node process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from planemesh.agent.metrics_text import CounterMetricFamily, GaugeMetricFamily, Metric


@dataclass(slots=True)
class HbonePeerStats:
    peer: str  # the peer node's name in the settings (inbound: its address when it is not a listed peer)
    direction: str  # outbound | inbound
    connections: int = 0  # mTLS h2 connections established
    streams: int = 0  # CONNECT tunnels answered 200
    bytes_sent: int = 0  # tunnel payload this node sent to the peer
    bytes_received: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # reason -> tunnels refused


@dataclass(slots=True)
class HboneNodeStats:
    up: int = 0  # the HBONE node process runs and said ready
    restarts: int = 0  # the agent restarted it after an exit
    captured: int = 0  # pod connections captured for HBONE (current process)
    pid: int = 0
    wds_acks: int = 0  # WDS responses ACKed / NACKed (current process)
    wds_nacks: int = 0


PEER_KEY = ("peer", "direction")


def hbone_families(peers: Sequence[HbonePeerStats], nodes: Sequence[HboneNodeStats]) -> Iterator[Metric]:
    labels = ["peer", "direction"]
    conns = CounterMetricFamily("planemesh_hbone_connections", "HBONE mTLS connections per peer node", labels=labels)
    streams = CounterMetricFamily("planemesh_hbone_streams", "HBONE CONNECT tunnels per peer node", labels=labels)
    nbytes = CounterMetricFamily(
        "planemesh_hbone_bytes", "Tunnel payload bytes per peer node (flow: sent to / received from it)",
        labels=[*labels, "flow"],
    )  # fmt: skip
    refused = CounterMetricFamily(
        "planemesh_hbone_refused", "HBONE tunnels refused, by reason (docs/hbone.md)", labels=[*labels, "reason"]
    )
    for r in peers:
        values = [r.peer, r.direction]
        conns.add_metric(values, r.connections)
        streams.add_metric(values, r.streams)
        nbytes.add_metric([*values, "sent"], r.bytes_sent)
        nbytes.add_metric([*values, "received"], r.bytes_received)
        for reason, n in sorted(r.refused.items()):
            refused.add_metric([*values, reason], n)
    yield from (conns, streams, nbytes, refused)
    if nodes:
        node = nodes[0]
        yield GaugeMetricFamily("planemesh_hbone_up", "1 while the HBONE node process runs and is ready", value=node.up)
        yield CounterMetricFamily("planemesh_hbone_restarts", "HBONE node restarts by the agent", value=node.restarts)
        wds = CounterMetricFamily("planemesh_hbone_wds_responses", "WDS responses by result (ack, nack)",
                                  labels=["result"])  # fmt: skip
        wds.add_metric(["ack"], node.wds_acks)
        wds.add_metric(["nack"], node.wds_nacks)
        yield wds
