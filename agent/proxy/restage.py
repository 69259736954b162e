"""A same-node client's retry to another local pod re-runs that pod's stage (docs/workloads.md, "Same-node
requests get both stages"). Pure.

With sidecars, pod A's sidecar retries to another endpoint of its cluster; when that endpoint is pod C of the
same node, C's sidecar applies C's inbound stage to the retry (its RBAC, routes, faults, limits, retries), not
B's. One hop does the same (Attempt.next_target runs pipeline.local_inbound at C's endpoint), with one limit:
the retry resends the request head built for the first stage, so an endpoint whose stage would change the head
differently (other rewrites or request header changes) is passed over instead (`same_head`).
"""

from __future__ import annotations

from planemesh.model.config import Route

GO, SKIP, ANSWERED = 0, 1, 2  # attempt_stage.enter_stage: send to the endpoint, pass it over, the stage answered


def _head_changes(route: Route) -> tuple:
    action = route.action
    if action is None:
        return (route.request_headers_to_remove, route.request_headers_to_add, None, None, None)
    prefix = route.match.prefix if action.prefix_rewrite is not None else None
    return (route.request_headers_to_remove, route.request_headers_to_add, action.prefix_rewrite, prefix,
            action.host_rewrite)  # fmt: skip


def same_head(a: Route | None, b: Route | None) -> bool:
    """Whether two (chained) routes change the upstream request head alike: rewrites and request headers."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    return _head_changes(a) == _head_changes(b)
