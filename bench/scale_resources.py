"""The resource set of the scale benchmark (bench/scale.py): N EDS clusters x M endpoints and R routes spread over
V virtual hosts of one RouteConfiguration, as Istio lays them out (one virtual host per service, a few routes
each). Also what the in-process profile (`python -m bench scale --in-process`) translates.

Endpoints are in the lab's OAM plane (198.18.1.0/24): addresses only, nothing connects to them. Bumping one
cluster's `endpoint_bump` or one route's `route_bump` changes exactly one endpoint or one route.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from planemesh.labs.envoy_resources import eds_cluster, http_listener, load_assignment, locality


@dataclass
class Shape:
    clusters: int = 1000
    endpoints: int = 10  # per cluster
    routes: int = 10_000
    vhosts: int = 1000
    endpoint_bump: dict[int, int] = field(default_factory=dict)  # cluster index -> port offset
    route_bump: dict[int, int] = field(default_factory=dict)  # route index -> generation in its path

    def cluster_name(self, i: int) -> str:
        return f"svc-{i:04d}"


def endpoint_docs(shape: Shape, i: int) -> list[dict[str, Any]]:
    name = shape.cluster_name(i)
    bump = shape.endpoint_bump.get(i, 0)
    eps = [(f"198.18.1.{1 + e % 250}", 10000 + (i * 16 + e) % 50000 + bump) for e in range(shape.endpoints)]
    return [eds_cluster(name), load_assignment(name, [locality(eps)])]


def route_doc(shape: Shape, r: int) -> dict[str, Any]:
    """Route r: a prefix of its own to cluster r % clusters (a path match, a header match every 4th route)."""
    gen = shape.route_bump.get(r, 0)
    match: dict[str, Any] = {"prefix": f"/r{r}/g{gen}/"}
    if r % 4 == 3:
        match["headers"] = [{"name": "x-version", "string_match": {"exact": f"v{r % 3}"}}]
    return {"match": match, "route": {"cluster": shape.cluster_name(r % max(shape.clusters, 1)), "timeout": "5s"}}


def route_config_doc(shape: Shape, name: str = "routes") -> dict[str, Any]:
    vhosts: list[dict[str, Any]] = []
    per = -(-shape.routes // max(shape.vhosts, 1))  # ceil
    for v in range(max(shape.vhosts, 1)):
        routes = [route_doc(shape, r) for r in range(v * per, min((v + 1) * per, shape.routes))]
        if not routes:
            break
        vhosts.append({"name": f"vh{v}", "domains": [f"svc-{v:04d}.example", f"svc-{v:04d}.example:80"],
                       "routes": routes})  # fmt: skip
    if not vhosts:
        vhosts = [{"name": "any", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response":
                                                              {"status": 404}}]}]  # fmt: skip
    return {"@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "name": name,
            "virtual_hosts": vhosts}  # fmt: skip


def all_docs(shape: Shape) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [http_listener(), route_config_doc(shape)]
    for i in range(shape.clusters):
        docs += endpoint_docs(shape, i)
    return docs
