"""deploy/planemesh-dashboard.json: valid Grafana dashboard JSON whose queries use only metrics the agent exposes.

The metric names come from the code: an AdminApp (the admin endpoint's registry: PlanemeshCollector + process
metrics) is fed one row of every StatsReport row type and scraped; nothing here lists the agent's metrics by hand.
"""

from __future__ import annotations

import dataclasses
import json
import re
import runpy
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from planemesh.agent.admin import AdminApp
from planemesh.agent.sdnotify import Readiness
from planemesh.agent.stats_report import ROW_TYPES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "planemesh-dashboard.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "info": ("_info",)}  # fmt: skip
# Exposed for the whole agent, not per plane: queries on them need no $plane.
AGENT_WIDE = (
    "planemesh_xds_",
    "planemesh_ready",
    "planemesh_readiness_blocker",
    "planemesh_stats_provider",
    "process_",
)


def one_of_every_row() -> dict:
    """A stats report with one row of every type, every counter and every dict filled."""
    report: dict = {"xds_connected": True}
    for key, cls in ROW_TYPES.items():
        row = {}
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                row[f.name] = "x"  # the label fields
            elif f.type in ("int", int):
                row[f.name] = 1
            elif str(f.type).startswith("dict[str, int]"):
                row[f.name] = {"k": 1}
        report[key] = [row]
    return report


def exposed_metric_names() -> set[str]:
    app = AdminApp(Readiness(["config"]))
    app.stats.register("all", one_of_every_row)
    resp = app.handle("GET", "/stats")
    assert resp.status == 200
    names: set[str] = set()
    for family in text_string_to_metric_families(resp.body.decode()):
        names.add(family.name)
        names.update(family.name + s for s in SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def graph_panels(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def metric_names(expr: str) -> set[str]:
    """Identifiers directly followed by a selector or range ({ or [), plus every planemesh_/process_ name."""
    selected = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", expr))
    return selected | set(re.findall(r"\b((?:planemesh|process)_[a-zA-Z0-9_]+)", expr))


def test_dashboard_is_what_the_generator_writes() -> None:
    module = runpy.run_path(str(ROOT / "scripts" / "gen_dashboard.py"), run_name="dashboard")
    assert DASHBOARD.read_text() == module["render"](), "run: python3 scripts/gen_dashboard.py"


def test_dashboard_schema() -> None:
    dash = dashboard()
    assert isinstance(dash["title"], str) and dash["uid"] and isinstance(dash["schemaVersion"], int)
    panels = graph_panels(dash)
    assert len(panels) >= 15
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")) and grid["x"] + grid["w"] <= 24
        assert panel["title"] and panel["datasource"]["type"] == "prometheus"
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no targets"
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    plane = variables["plane"]
    assert plane["type"] == "query" and plane["multi"] and plane["includeAll"]
    assert metric_names(plane["query"]["query"]) <= exposed_metric_names()


def test_every_metric_in_the_dashboard_exists_in_the_agent() -> None:
    exposed = exposed_metric_names()
    used = {name for p in graph_panels(dashboard()) for t in p["targets"] for name in metric_names(t["expr"])}
    assert used, "no metric found in the dashboard"
    assert used <= exposed, f"not exposed by the agent: {sorted(used - exposed)}"


def test_per_plane_queries_filter_on_the_plane_variable() -> None:
    for panel in graph_panels(dashboard()):
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            if not all(n.startswith(AGENT_WIDE) for n in names):
                assert 'plane=~"$plane"' in target["expr"], (panel["title"], target["expr"])


def test_the_operator_view_is_covered() -> None:
    used = {name for p in graph_panels(dashboard()) for t in p["targets"] for name in metric_names(t["expr"])}
    for wanted in ("planemesh_http_requests_total", "planemesh_http_response_flags_total",
                   "planemesh_http_request_duration_seconds_bucket", "planemesh_bpf_packets_total",
                   "planemesh_bpf_bytes_total", "planemesh_rate_limited_total", "planemesh_overload_shed_total",
                   "planemesh_connections_refused_per_source_total", "planemesh_plane_limit_applied",
                   "planemesh_xds_connected", "planemesh_xds_nacks_total"):  # fmt: skip
        assert wanted in used, wanted


def test_metric_name_check_catches_a_typo() -> None:
    assert metric_names('sum(rate(planemesh_http_request_totl{plane=~"$plane"}[1m]))') - exposed_metric_names()
