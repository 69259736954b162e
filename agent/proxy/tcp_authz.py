"""Network RBAC (envoy.filters.network.rbac) for tcp_proxy chains: checked once per connection, before a
byte is relayed, as Envoy's ONE_TIME_ON_FIRST_BYTE does.

The facts are the connection's: source address (the TCP peer), original destination address and port, the
plane it arrived on and, when the chain terminated mTLS, the client certificate's SPIFFE ID. A denial closes
the connection (reset: the client sees it refused, the upstream never sees it), counted in the plane's
`rbac_denied` (planemesh_rbac_denied_total) and logged with the policy that decided.
"""

from __future__ import annotations

import logging
from typing import Any

from planemesh.agent.rbac import RbacFilter, RequestFacts, evaluate

log = logging.getLogger("planemesh.proxy.rbac")
_NO_HEADERS: dict[str, str] = {}


def tcp_denial(
    proxy: Any,
    chain: str,
    rbacs: tuple[RbacFilter, ...],
    src_ip: str,
    dst: tuple[str, int],
    peer: str | None,
) -> str | None:
    """None when every network RBAC filter of the chain allows the connection, else why not."""
    facts = RequestFacts(_NO_HEADERS, "", dst[0], dst[1], src_ip, peer, proxy.plane_name)
    for rbac in rbacs:
        allowed, policy = evaluate(rbac, facts)
        if not allowed:
            proxy.tls_stats.rbac_denied += 1
            why = f"{rbac.action} policy {policy}" if policy else "no ALLOW policy matched"
            log.info(
                "tcp %s:%s from %s (%s) on chain %s: denied, %s",
                dst[0], dst[1], src_ip, peer or "plaintext", chain, why,
            )  # fmt: skip
            return why
    return None
