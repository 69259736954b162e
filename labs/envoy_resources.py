"""Envoy v3 resources (json_format form, with `@type`) for lab tests and benchmarks that drive the agent over xDS.

    docs = [http_listener(filters=[fault(abort_status=503, abort_percent=50)]),
            route_config([route(cluster="v1")]),
            eds_cluster("v1"), load_assignment("v1", [locality([("198.18.1.2", 8081)])])]

Write them to a file for `--xds-resources` (`write_resource_file`), or hand them to a management server
(`by_type`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import message

from planemesh.xds.resources import parse_resource_dict, unpack

T = "type.googleapis.com/"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
}
FAULT = T + "envoy.extensions.filters.http.fault.v3.HTTPFault"
LOCAL_RATELIMIT = T + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
PASSTHROUGH = {"@type": T + "envoy.config.cluster.v3.Cluster", "name": "passthrough", "type": "ORIGINAL_DST",
               "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s"}  # fmt: skip


def _ms(ms: float) -> str:
    return f"{ms / 1000:.3f}s"


def _percent(value: float) -> dict:
    return {"numerator": round(value * 100), "denominator": "TEN_THOUSAND"}


def http_listener(name: str = "http", port: int = 80, filters: Sequence[dict] = (), routes: str = "routes") -> dict:
    """An HTTP listener on every plane (0.0.0.0) with these HTTP filters before the router, routes over RDS."""
    hcm = {"@type": HCM, "stat_prefix": name, "rds": {"route_config_name": routes, "config_source": {"ads": {}}},
           "http_filters": [*filters, ROUTER]}  # fmt: skip
    return {
        "@type": T + "envoy.config.listener.v3.Listener",
        "name": name,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def fault(
    *,
    delay_ms: float | None = None,
    delay_percent: float = 100,
    abort_status: int | None = None,
    abort_percent: float = 100,
    header_controlled: bool = False,
) -> dict:
    """The fault HTTP filter: a fixed delay and/or an abort, each by percentage (or by x-envoy-fault-* headers)."""
    cfg: dict[str, Any] = {"@type": FAULT}
    if delay_ms is not None or header_controlled:
        cfg["delay"] = {"percentage": _percent(delay_percent)}
        if header_controlled:
            cfg["delay"]["header_delay"] = {}
        else:
            cfg["delay"]["fixed_delay"] = _ms(delay_ms or 0)
    if abort_status is not None or header_controlled:
        cfg["abort"] = {"percentage": _percent(abort_percent)}
        if header_controlled:
            cfg["abort"]["header_abort"] = {}
        else:
            cfg["abort"]["http_status"] = abort_status
    return {"name": "envoy.filters.http.fault", "typed_config": cfg}


def local_ratelimit(max_tokens: int, tokens_per_fill: int, fill_interval_ms: float) -> dict:
    bucket = {"max_tokens": max_tokens, "tokens_per_fill": tokens_per_fill, "fill_interval": _ms(fill_interval_ms)}
    everyone = {"default_value": _percent(100)}  # Envoy enables and enforces nothing unless told
    cfg = {"@type": LOCAL_RATELIMIT, "stat_prefix": "rl", "token_bucket": bucket,
           "filter_enabled": everyone, "filter_enforced": everyone}  # fmt: skip
    return {"name": "envoy.filters.http.local_ratelimit", "typed_config": cfg}


def route(prefix: str = "/", cluster: str | None = None, *, headers: Sequence[dict] = (),
          weighted: dict[str, int] | None = None, **action: Any) -> dict:  # fmt: skip
    """One route: a prefix (and header matchers) to a cluster or weighted clusters; `action` adds RouteAction
    fields (retry_policy, hash_policy, request_mirror_policies, timeout...)."""
    if weighted is not None:
        target: dict[str, Any] = {
            "weighted_clusters": {"clusters": [{"name": n, "weight": w} for n, w in weighted.items()]}
        }
    else:
        target = {"cluster": cluster}
    match: dict[str, Any] = {"prefix": prefix}
    if headers:
        match["headers"] = list(headers)
    return {"match": match, "route": {**target, **action}}


def header_exact(name: str, value: str) -> dict:
    return {"name": name, "string_match": {"exact": value}}


def route_config(routes: Sequence[dict], name: str = "routes") -> dict:
    return {"@type": T + "envoy.config.route.v3.RouteConfiguration", "name": name,
            "virtual_hosts": [{"name": "any", "domains": ["*"], "routes": list(routes)}]}  # fmt: skip


def eds_cluster(name: str, lb_policy: str = "ROUND_ROBIN", **fields: Any) -> dict:
    """An EDS cluster (its ClusterLoadAssignment has the same name); `fields` adds Cluster fields
    (circuit_breakers, outlier_detection, common_lb_config...)."""
    return {"@type": T + "envoy.config.cluster.v3.Cluster", "name": name, "type": "EDS", "lb_policy": lb_policy,
            "connect_timeout": "1s", "eds_cluster_config": {"eds_config": {"ads": {}}}, **fields}  # fmt: skip


def locality(endpoints: Iterable[tuple[str, int]], *, zone: str = "", weight: int | None = None,
             priority: int = 0, unhealthy: Iterable[tuple[str, int]] = ()) -> dict:  # fmt: skip
    """One LocalityLbEndpoints: (address, port) endpoints, the locality's zone and weight; `unhealthy` ones are
    listed with health_status UNHEALTHY."""
    down = set(unhealthy)
    lbes = []
    for address, port in [*endpoints, *down]:
        lbe: dict[str, Any] = {"endpoint": {"address": {"socket_address": {"address": address, "port_value": port}}}}
        if (address, port) in down:
            lbe["health_status"] = "UNHEALTHY"
        lbes.append(lbe)
    out: dict[str, Any] = {"lb_endpoints": lbes, "priority": priority}
    if zone:
        out["locality"] = {"region": "lab", "zone": zone}
    if weight is not None:
        out["load_balancing_weight"] = weight
    return out


def load_assignment(name: str, localities: Sequence[dict]) -> dict:
    return {"@type": T + "envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name": name,
            "endpoints": list(localities)}  # fmt: skip


def by_type(docs: Iterable[dict]) -> dict[str, list[message.Message]]:
    """Resource dicts -> decoded messages per type URL (what ManagementServer.set_resources takes)."""
    out: dict[str, list[message.Message]] = {}
    for i, doc in enumerate(docs):
        packed = parse_resource_dict(doc, f"resource[{i}]")
        out.setdefault(packed.type_url, []).append(unpack(packed, packed.type_url))
    return out


def write_resource_file(path: Path, docs: list[dict]) -> None:
    """JSON (fast to read back: 10,000 routes parse in well under a second), written atomically: the
    management server polling the directory never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(docs))
    os.replace(tmp, path)
