"""Shadow copies of a same-node client's request to a local pod go through that pod's inbound stage
(docs/workloads.md, "Same-node requests get both stages").

With sidecars, a mirror from pod A's sidecar to pod C reaches C's sidecar, which applies C's inbound filters
and routes to the shadow (Host `<authority>-shadow`) like to any request: its RBAC (by A's identity), its
routes (no route: 404), rate limits and fault aborts answer it there, and A never sees that answer. One hop
does the same decision with pipeline.local_inbound at the mirror's endpoint and sends only the shadows C's
stage would forward. C's header changes and rewrites are not applied to the shadow (it is the primary's head).
"""

from __future__ import annotations

from typing import Any

from planemesh.agent.proxy import pipeline
from planemesh.agent.proxy.circuit import REQUESTS


def staged_mirrors(proxy: Any, context: tuple, targets: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """`targets` without the shadows a local pod's stage answers itself. `context`: Attempt.local_client
    (router, client route config, the client's RouteResult, authority, target, headers, rbac_denied,
    principal). A target that is no local pod's inbound endpoint is kept as it is."""
    _router, crc, result, authority, target, headers, rbac_denied, principal = context
    kept = []
    for addr in targets:
        step = pipeline.local_inbound(proxy, crc, addr, result, authority + "-shadow", target, headers, rbac_denied,
                                      principal)  # fmt: skip
        if type(step) is pipeline.Local:
            continue  # answered by that pod's stage: the shadow goes nowhere
        if step is not None:
            chained = step.result if type(step) is pipeline.Staged else step
            if chained.inbound_hold is not None:  # a shadow holds no request unit (it is not tracked to its end)
                chained.inbound_hold.release(REQUESTS)
        kept.append(addr)
    return kept
