"""Per-worker counters behind Istio's standard metrics, with the peers' identities (agent/istio_metrics.py
turns the rows into istio_requests_total, istio_request_duration_milliseconds and istio_tcp_*).

Only traffic of istiod-named clusters (`outbound|...`, `inbound|...`) is counted, per (cluster, source
principal, destination principal). The principals are what the handshakes proved:
  inbound (reporter destination): source = the client certificate's SPIFFE ID, destination = ours on
  that connection;
  outbound (reporter source): source = our client certificate's SPIFFE ID when the endpoint is reached
  over TLS, destination = the cluster's SAN matcher when it names exactly one SPIFFE ID (the handshake
  verified the server holds it), else unknown;
  a same-node request through the server pod's stage (one hop for both sidecars): source = the client
  pod's, destination = the server pod's SPIFFE ID, both from the node's pod table (Attempt.local_peer).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from planemesh.agent.proxy.accesslog import peer_identity
from planemesh.agent.proxy.stats import LATENCY_BUCKETS_MS
from planemesh.agent.proxy.tls_context import uri_of
from planemesh.model.tls_config import TlsContext, endpoint_tls

UNKNOWN = "unknown"
MAX_KEYS = 4096  # (cluster, principals) rows per worker; beyond it new combinations are counted as unknown


ISTIO_CLUSTER_PREFIXES = ("outbound|", "inbound|")  # a request's caller may check these before calling record()


def _istio_cluster(name: str) -> bool:
    return name.startswith(ISTIO_CLUSTER_PREFIXES)


class _Row:
    __slots__ = ("closed", "latency", "opened", "received", "responses", "sent", "sum_ms")

    def __init__(self) -> None:
        self.responses = [0] * 6  # index = status // 100
        self.latency = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self.sum_ms = 0.0
        self.opened = self.closed = self.sent = self.received = 0  # TCP (istio_tcp_*)


class IstioCounters:
    __slots__ = ("_local_uri", "rows")

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], _Row] = {}
        self._local_uri: dict[Any, str | None] = {}

    def _row(self, cluster: str, source: str | None, destination: str | None) -> _Row:
        key = (cluster, source or UNKNOWN, destination or UNKNOWN)
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= MAX_KEYS:
                key = (cluster, UNKNOWN, UNKNOWN)
                row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = _Row()
        return row

    def principals(self, proxy: Any, cluster: Any, endpoint: Any, addr: Any, downstream: Any) -> tuple:
        """(source, destination) principals of one request or connection (module doc)."""
        attempt = getattr(downstream, "attempt", None)
        peer = attempt.local_peer if attempt is not None else None
        if peer is not None:
            return peer, proxy.table.router.pods.principal(addr[0]) if addr else None
        if cluster.name.startswith("inbound|"):
            ssl_object = _ssl_object(downstream)
            return peer_identity(downstream), getattr(ssl_object, "planemesh_local", None)
        tls = endpoint_tls(cluster, endpoint, addr or ("", 0))
        if tls is None:
            return None, None
        return self.our_uri(proxy, tls), exact_spiffe(tls)

    def our_uri(self, proxy: Any, tls: TlsContext) -> str | None:
        cert = proxy.table.snapshot.secrets.get(tls.cert) if tls.cert else None
        if cert not in self._local_uri:
            if len(self._local_uri) > 64:  # old certificates after rotations
                self._local_uri.clear()
            self._local_uri[cert] = uri_of(cert)
        return self._local_uri[cert]

    def record(
        self, proxy: Any, rec: Any, cluster: Any, endpoint: Any, addr: Any, status: int, duration_ms: float
    ) -> None:
        """One finished HTTP request; `rec` (an Exchange or an h2 stream) reaches the client connection as `.ds`."""
        if cluster is None or not _istio_cluster(cluster.name):
            return
        source, destination = self.principals(proxy, cluster, endpoint, addr, rec)
        row = self._row(cluster.name, source, destination)
        cls = status // 100
        row.responses[cls if 0 <= cls < 6 else 0] += 1
        row.latency[bisect_left(LATENCY_BUCKETS_MS, duration_ms)] += 1
        row.sum_ms += duration_ms

    def tcp(self, cluster: str, source: str | None, destination: str | None) -> _Row | None:
        """The row of one relayed TCP connection (opened counted here; the caller adds bytes and closes)."""
        if not _istio_cluster(cluster):
            return None
        row = self._row(cluster, source, destination)
        row.opened += 1
        return row

    def report(self, plane: str) -> list[dict[str, Any]]:
        """Rows for agent/stats_report.py's IstioStats."""
        bounds = tuple(b / 1000 for b in LATENCY_BUCKETS_MS)
        return [
            {
                "plane": plane, "cluster": cluster, "source_principal": src, "destination_principal": dst,
                "responses": {f"{i}xx": n for i, n in enumerate(row.responses) if i and n},
                "latency": {"bounds": bounds, "counts": list(row.latency), "sum_s": row.sum_ms / 1000},
                "tcp_opened": row.opened, "tcp_closed": row.closed,
                "tcp_sent_bytes": row.sent, "tcp_received_bytes": row.received,
            }
            for (cluster, src, dst), row in self.rows.items()
        ]  # fmt: skip


def _ssl_object(rec: Any) -> Any:
    transport = getattr(getattr(rec, "ds", None), "transport", None)
    return transport.get_extra_info("ssl_object") if transport is not None else None


def exact_spiffe(tls: TlsContext) -> str | None:
    exact = [m.exact for m in tls.san if m.exact is not None and m.exact.startswith("spiffe://")]
    return exact[0] if len(exact) == 1 and len(tls.san) == 1 else None
