"""Writes deploy/planemesh-dashboard.json, the Grafana dashboard of the agent's Prometheus metrics per plane.

    python3 scripts/gen_dashboard.py          # rewrite the JSON
    python3 scripts/gen_dashboard.py --check  # exit 1 when the JSON is not what this script writes

Panels are listed here as (title, unit, [(PromQL, legend)]); tests/unit/test_ops_dashboard.py checks every metric
name used against what the agent's admin endpoint exposes. `$plane` is a multi-value template variable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deploy" / "planemesh-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
P = 'plane=~"$plane"'
RI = "$__rate_interval"


def rate(metric: str, by: str = "plane", extra: str = "") -> str:
    sel = f"{P},{extra}" if extra else P
    return f"sum by ({by}) (rate({metric}{{{sel}}}[{RI}]))"


def gauge(metric: str, by: str = "plane", agg: str = "sum") -> str:
    return f"{agg} by ({by}) ({metric}{{{P}}})"


def quantile(q: float) -> str:
    return f"histogram_quantile({q}, {rate('planemesh_http_request_duration_seconds_bucket', 'plane, le')})"


Target = tuple[str, str]
# (row title, [(panel title, unit, [(expr, legend)])])
# fmt: off
ROWS: list[tuple[str, list[tuple[str, str, list[Target]]]]] = [
    ("Requests", [
        ("Requests per second", "reqps", [(rate("planemesh_http_requests_total"), "{{plane}}")]),
        ("Responses by class", "reqps", [
            (rate("planemesh_http_responses_total", "plane, class"), "{{plane}} {{class}}"),
        ]),
        ("Latency percentiles", "s", [
            (quantile(0.5), "{{plane}} p50"), (quantile(0.9), "{{plane}} p90"), (quantile(0.99), "{{plane}} p99"),
        ]),
        ("Active connections", "short", [
            (gauge("planemesh_listener_active_connections"), "{{plane}} downstream"),
            (gauge("planemesh_cluster_active_connections"), "{{plane}} upstream"),
        ]),
    ]),
    ("Errors", [
        ("Errors by response flag", "reqps", [
            (rate("planemesh_http_response_flags_total", "plane, flag"), "{{plane}} {{flag}}"),
        ]),
        ("5xx ratio", "percentunit", [(
            rate("planemesh_http_responses_total", extra='class="5xx"')
            + " / "
            + rate("planemesh_http_requests_total"),
            "{{plane}}",
        )]),
        ("Upstream and downstream errors", "ops", [
            (rate("planemesh_cluster_connect_failures_total"), "{{plane}} connect failures"),
            (rate("planemesh_cluster_retries_total"), "{{plane}} retries"),
            (rate("planemesh_cluster_outlier_ejections_total"), "{{plane}} outlier ejections"),
            (rate("planemesh_listener_downstream_errors_total"), "{{plane}} downstream errors"),
            (rate("planemesh_passthrough_connect_failures_total"), "{{plane}} passthrough connect failures"),
        ]),
    ]),
    ("Data path: bypassed vs proxied", [
        ("Packets by TC verdict", "pps", [
            (rate("planemesh_bpf_packets_total", "plane, verdict"), "{{plane}} {{verdict}}"),
        ]),
        ("Bytes by TC verdict", "Bps", [
            (rate("planemesh_bpf_bytes_total", "plane, verdict"), "{{plane}} {{verdict}}"),
        ]),
        ("Proxied bytes", "Bps", [
            (rate("planemesh_http_request_bytes_total"), "{{plane}} http request bodies"),
            (rate("planemesh_http_response_bytes_total"), "{{plane}} http response bodies"),
            (rate("planemesh_passthrough_bytes_total", "plane, direction"), "{{plane}} passthrough {{direction}}"),
        ]),
        ("Interfaces attached", "short", [
            (gauge("planemesh_bpf_interfaces_attached"), "{{plane}}"),
        ]),
    ]),
    ("SLA limits hit", [
        ("Rate limited and circuit breakers", "ops", [
            (rate("planemesh_rate_limited_total"), "{{plane}} rate limited"),
            (rate("planemesh_cluster_circuit_breaker_overflows_total", "plane, resource"),
             "{{plane}} breaker {{resource}}"),
        ]),
        ("Overload shedding and per-source refusals", "ops", [
            (rate("planemesh_overload_shed_total", "plane, what"), "{{plane}} shed {{what}}"),
            (rate("planemesh_overload_resets_total"), "{{plane}} resets"),
            (rate("planemesh_connections_refused_per_source_total"), "{{plane}} refused per source"),
            (rate("planemesh_idle_connections_closed_total"), "{{plane}} idle closed"),
        ]),
        ("Workers in overload", "short", [
            (gauge("planemesh_overload_workers", "plane, level"), "{{plane}} {{level}}"),
        ]),
        ("Worker memory growth vs limit", "bytes", [
            (gauge("planemesh_worker_memory_bytes"), "{{plane}} RSS growth since start"),
            (gauge("planemesh_plane_memory_max_bytes", agg="max"), "{{plane}} memory.max"),
        ]),
        ("Plane limits not applied", "short", [
            (f"planemesh_plane_limit_applied{{{P}}} == 0", "{{plane}} {{limit}}"),
        ]),
    ]),
    ("xDS and agent", [
        ("xDS connected, agent ready", "short", [
            ("max(planemesh_xds_connected)", "xds connected"),
            ("max(planemesh_ready)", "ready"),
            ("sum by (blocker) (planemesh_readiness_blocker)", "blocked: {{blocker}}"),
        ]),
        ("xDS ACKs and NACKs", "ops", [
            (f"sum by (type_url) (rate(planemesh_xds_acks_total[{RI}]))", "ACK {{type_url}}"),
            (f"sum by (type_url) (rate(planemesh_xds_nacks_total[{RI}]))", "NACK {{type_url}}"),
        ]),
        ("xDS resources and versions", "short", [
            ("sum by (type_url) (planemesh_xds_resources)", "{{type_url}}"),
            ("count by (type_url, version) (planemesh_xds_version_info)", "{{type_url}} v{{version}}"),
        ]),
        ("Agent process", "bytes", [
            ("process_resident_memory_bytes", "agent RSS"),
            (f"rate(process_cpu_seconds_total[{RI}])", "agent CPU (s/s)"),
            ("sum(planemesh_stats_provider_errors_total)", "stats provider errors"),
        ]),
    ]),
]
# fmt: on


def panels() -> list[dict]:
    out: list[dict] = []
    y, pid = 0, 1
    for row_title, row_panels in ROWS:
        out.append(
            {
                "type": "row",
                "id": pid,
                "title": row_title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        pid, y = pid + 1, y + 1
        for i, (title, unit, targets) in enumerate(row_panels):
            out.append(
                {
                    "type": "timeseries",
                    "id": pid,
                    "title": title,
                    "datasource": DS,
                    "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)},
                    "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                    "options": {
                        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"},
                    },
                    "targets": [
                        {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + k)}
                        for k, (expr, legend) in enumerate(targets)
                    ],
                }
            )
            pid += 1
        y += 8 * ((len(row_panels) + 1) // 2)
    return out


def dashboard() -> dict:
    return {
        "title": "planemesh",
        "uid": "planemesh-agent",
        "description": "planemesh node agent per plane: requests, errors, latency, data path, SLA limits, xDS",
        "tags": ["planemesh", "service-mesh"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "plane",
                    "type": "query",
                    "label": "plane",
                    "datasource": DS,
                    "definition": "label_values(planemesh_listener_connections_total, plane)",
                    "query": {"query": "label_values(planemesh_listener_connections_total, plane)", "refId": "plane"},
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {},
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if OUT.read_text() == render() else 1)
    OUT.write_text(render())
    print(f"wrote {OUT}")
