"""RBAC enforcement for both codecs: the request's facts in, a denial reason (or None) out.

Called by Exchange.start (HTTP/1.1) and the h2 stream's routing, once per request, only on listeners with an
RBAC filter. A denial is answered 403 `RBAC: access denied` (Envoy's body), counted (`rbac_denied`) and logged
with the policy that decided.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from planemesh.agent.rbac import RbacFilter, RequestFacts, evaluate

log = logging.getLogger("planemesh.proxy.rbac")
DENIED_BODY = b"RBAC: access denied"


def rbac_denial(
    proxy: Any,
    rbacs: tuple[RbacFilter, ...],
    headers: Callable[[], dict[str, str]],
    method: str,
    target: str,
    authority: str,
    local: tuple[str, int],
    peer_ip: str,
    transport: Any,
    principal: str | None = None,
) -> str | None:
    """None when every RBAC filter allows the request, else why not (for the log). The peer principal is
    `principal` when given (a same-node client pod's SPIFFE ID from the node's pod table, for a local server
    pod's inbound stage: pipeline.ServerView), else the client certificate's."""
    if principal is not None:
        peer = principal
    else:
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        peer = getattr(ssl_object, "planemesh_peer", None) if ssl_object is not None else None
    path = target.split("?", 1)[0]
    pseudo = {":method": method, ":path": path, ":authority": authority}
    facts = RequestFacts({**headers(), **pseudo}, path, local[0], local[1], peer_ip, peer, proxy.plane_name)
    for rbac in rbacs:
        allowed, policy = evaluate(rbac, facts)
        if not allowed:
            proxy.tls_stats.rbac_denied += 1
            why = f"{rbac.action} policy {policy}" if policy else "no ALLOW policy matched"
            log.info("%s %s %s from %s (%s): denied, %s", method, authority, path, peer_ip, peer or "plaintext", why)
            return why
    return None
