"""The server pod's inbound route stage of a local-to-local request, pure (docs/workloads.md).

With sidecars, a request from pod A to pod B crosses A's sidecar (outbound routes) then B's (inbound routes).
planemesh serves both pods in one proxy hop: A's route picks the cluster and the endpoint; when the endpoint
is a local workload's inbound listener, B's inbound route configuration is matched on the request as B's
sidecar would see it (A's rewrites and header changes applied), and the two routes are chained into one:
A's action (cluster, retries, rewrites), both routes' header changes in the order the sidecars apply them, the
tighter of the two timeouts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from planemesh.model.config import HeaderValue, Route


def seen_by_server(route: Route, authority: str, target: bytes) -> tuple[str, bytes]:
    """(authority, request-target) after the client's route rewrote them: what the server's sidecar matches."""
    action = route.action
    if action is None:
        return authority, target
    if action.host_rewrite is not None:
        authority = action.host_rewrite
    if action.prefix_rewrite is not None:
        prefix = route.match.prefix
        if prefix and target.startswith(prefix.encode()):
            target = action.prefix_rewrite.encode() + target[len(prefix) :]
    return authority, target


def headers_seen_by_server(route: Route, headers: Callable[[], Mapping[str, str]]) -> Callable[[], Mapping[str, str]]:
    """The request's header map (lower-case name -> value, repeated values joined with ",") after the client's
    route removed and added its headers; the same callable when the route changes none."""
    if not route.request_headers_to_remove and not route.request_headers_to_add:
        return headers

    def mutated() -> Mapping[str, str]:
        out = dict(headers())
        for name in route.request_headers_to_remove:
            out.pop(name.lower(), None)
        for hv in route.request_headers_to_add:
            name = hv.name.lower()
            old = out.get(name)
            out[name] = f"{old},{hv.value}" if hv.append and old is not None else hv.value
        return out

    return mutated


def _then(first_remove: tuple[str, ...], first_add: tuple[HeaderValue, ...], second_remove: tuple[str, ...],
          second_add: tuple[HeaderValue, ...]) -> tuple[tuple[str, ...], tuple[HeaderValue, ...]]:
    """Two remove-then-add stages as one: the second stage's removals also drop what the first one added."""
    gone = {n.lower() for n in second_remove}
    kept = tuple(hv for hv in first_add if hv.name.lower() not in gone)
    return first_remove + second_remove, kept + second_add


def chained(outbound: Route, inbound: Route) -> Route:
    """One route doing what the client's route then the server's inbound route do: the client's action; request
    headers changed by the client's route then the server's, response headers by the server's then the
    client's (the response crosses the server's sidecar first)."""
    req_remove, req_add = _then(outbound.request_headers_to_remove, outbound.request_headers_to_add,
                                inbound.request_headers_to_remove, inbound.request_headers_to_add)  # fmt: skip
    resp_remove, resp_add = _then(inbound.response_headers_to_remove, inbound.response_headers_to_add,
                                  outbound.response_headers_to_remove, outbound.response_headers_to_add)  # fmt: skip
    return dataclasses.replace(
        outbound, request_headers_to_remove=req_remove, request_headers_to_add=req_add,
        response_headers_to_remove=resp_remove, response_headers_to_add=resp_add,
    )  # fmt: skip


def tighter_timeout(a: float, b: float) -> float:
    """The request timeout of two hops in a row: the shorter one; 0 means none."""
    if a <= 0:
        return b
    if b <= 0:
        return a
    return min(a, b)
