"""The server pod's network RBAC on a same-node client pod's relayed TCP connection (docs/workloads.md).

With sidecars, pod A's outbound chain relays a connection to its cluster's endpoint and, when that endpoint is
pod B of the same node, B's sidecar applies B's inbound chain for it: its network RBAC, with A's identity from
the mTLS between the sidecars. When the plane's proxy relays A's connection (A's own chain: a tcp_proxy to a
cluster, network RBAC, TLS...) to an endpoint that is a local pod, B's inbound chain of that address and port
(what a connection from elsewhere to B would meet) is checked too, with A's SPIFFE ID from the pod table.
"""

from __future__ import annotations

from typing import Any

from planemesh.agent.proxy.sniff import Kind
from planemesh.agent.proxy.tcp_authz import tcp_denial


def local_server_denial(proxy: Any, table: Any, chain: Any, src: str, target: tuple[str, int], sni: str | None,
                        tls: bool, alpn: tuple[str, ...]) -> str | None:  # fmt: skip
    """Why the local server pod at `target` refuses the client pod `src`'s connection relayed by `chain`, or
    None: the client or the endpoint is no local pod, no inbound chain of the server's has network RBAC there,
    or it allows it."""
    router = table.router
    peer = router.pods.principal(src) if src else None
    if peer is None or router.pods.principal(target[0]) is None:
        return None
    sni_table = table.sni
    server = sni_table.select(target[1], target[0], sni, tls, alpn) or sni_table.select(target[1], target[0], None,
                                                                                     not tls)  # fmt: skip
    if server is None or server is chain or not server.rbac:
        return None
    return tcp_denial(proxy, server.name, server.rbac, src, target, peer)


def local_server_refuses(proxy: Any, src: str, chain: Any, table: Any, verdict: Any,
                         target: tuple[str, int]) -> bool:  # fmt: skip
    """local_server_denial for the connection from `src` (the client's address) as sniffed (`verdict`): True
    when the local server pod's inbound chain refuses it (counted and logged by tcp_denial)."""
    if not table.router.pods:  # no pod table: no local pods to ask about
        return False
    tls = verdict.kind is Kind.TLS
    return local_server_denial(proxy, table, chain, src, target, verdict.sni, tls, verdict.alpn) is not None
