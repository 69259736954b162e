"""The server pod's inbound route stage of a local-to-local request, pure (docs/workloads.md).

With sidecars, a request from pod A to pod B crosses A's sidecar (outbound routes) then B's (inbound routes).
planemesh serves both pods in one proxy hop: A's route picks the cluster and the endpoint; when the endpoint
is a local workload's inbound listener, B's inbound route configuration is matched on the request as B's
sidecar would see it (A's rewrites and header changes applied), and the two routes are chained into one:
A's action (cluster, retries), both routes' rewrites composed and header changes in the order the sidecars apply
them, the tighter of the two timeouts.
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


def composed_prefix_rewrite(outbound: Route, inbound: Route) -> tuple[str | None, str | None]:
    """(match prefix, prefix_rewrite) of one route doing the client's prefix rewrite (P1 -> R1) then the
    server's (P2 -> R2), for every request both routes matched (the server matched the rewritten path, so it
    starts with P2): P1 -> R2 + R1[len(P2):] when R1 holds P2, else (P1 + P2[len(R1):]) -> R2. A route
    without a prefix match rewrites nothing (request_head.prefix_rewritten), as for one route."""
    act1, act2 = outbound.action, inbound.action
    p1, r1 = outbound.match.prefix, act1.prefix_rewrite if act1 is not None else None
    if not p1 or r1 is None:
        p1 = r1 = ""
    p2, r2 = inbound.match.prefix, act2.prefix_rewrite if act2 is not None else None
    if not p2 or r2 is None:
        return (outbound.match.prefix, r1) if p1 else (outbound.match.prefix, None)
    if len(p2) <= len(r1):
        return p1, r2 + r1[len(p2) :]
    return p1 + p2[len(r1) :], r2


def chained(outbound: Route, inbound: Route) -> Route:
    """One route doing what the client's route then the server's inbound route do: the client's action with
    both routes' prefix rewrites composed and the server's host rewrite last; request headers changed by the
    client's route then the server's, response headers by the server's then the client's (the response
    crosses the server's sidecar first)."""
    req_remove, req_add = _then(outbound.request_headers_to_remove, outbound.request_headers_to_add,
                                inbound.request_headers_to_remove, inbound.request_headers_to_add)  # fmt: skip
    resp_remove, resp_add = _then(inbound.response_headers_to_remove, inbound.response_headers_to_add,
                                  outbound.response_headers_to_remove, outbound.response_headers_to_add)  # fmt: skip
    route = outbound
    act_in = inbound.action
    if act_in is not None and outbound.action is not None and (act_in.prefix_rewrite is not None
                                                                or act_in.host_rewrite is not None):  # fmt: skip
        prefix, rewrite = composed_prefix_rewrite(outbound, inbound)
        host = act_in.host_rewrite if act_in.host_rewrite is not None else outbound.action.host_rewrite
        action = dataclasses.replace(outbound.action, prefix_rewrite=rewrite, host_rewrite=host)
        route = dataclasses.replace(outbound, match=dataclasses.replace(outbound.match, prefix=prefix), action=action)
    return dataclasses.replace(
        route, request_headers_to_remove=req_remove, request_headers_to_add=req_add,
        response_headers_to_remove=resp_remove, response_headers_to_add=resp_add,
    )  # fmt: skip


def xfcc_element(mode: str, details: tuple[str, ...], by: str | None, client: str | None) -> bytes | None:
    """The x-forwarded-client-cert value the server's sidecar would set for a same-node client whose identity
    is `client` (the pod table's), by its listener's `forward_client_cert` mode and `client_cert_details`:
    append_forward and sanitize_set set this element (the client's sidecar sanitized what the client sent),
    the others none. Envoy's element order (By, Subject, URI); no Hash: there is no certificate to hash."""
    if client is None or mode not in ("append_forward", "sanitize_set"):
        return None
    parts = [f"By={by}"] if by else []
    if "subject" in details:
        parts.append('Subject=""')
    if "uri" in details:
        parts.append(f"URI={client}")
    return ";".join(parts).encode("latin-1", "replace") if parts else None


def tighter_timeout(a: float, b: float) -> float:
    """The request timeout of two hops in a row: the shorter one; 0 means none."""
    if a <= 0:
        return b
    if b <= 0:
        return a
    return min(a, b)
