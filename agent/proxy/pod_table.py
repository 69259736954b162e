"""The node's pod table as a plane's router sees it: which local workload holds an address, its SPIFFE ID, and
the x-forwarded-client-cert its inbound chains set (docs/workloads.md, "Same-node requests get both stages").

Built from the snapshot's listeners: agent/workloads/merge.py stamps every listener scoped to a workload with
its ID (Listener.workload_principal; its addresses are the listener's `sources`, outbound, or `prefixes`,
inbound). ztunnel keeps the same table to know a captured pod's identity from its address.
"""

from __future__ import annotations

from typing import Any

from planemesh.agent.proxy.local_inbound import xfcc_element
from planemesh.model.config import Listener
from planemesh.model.ip import AddrFormatError, IPAddress


def _ip(text: str) -> str:
    """An address as the table keys it (a scope id dropped, `::ffff:a.b.c.d` as the v4 address)."""
    ip = IPAddress(text.split("%", 1)[0])
    return str(ip.ipv4() if ip.version == 6 and ip.is_ipv4_mapped() else ip)


class PodTable:
    __slots__ = ("_principals", "_xfcc")

    def __init__(self) -> None:
        self._principals: dict[str, str] = {}  # a local workload's address -> its SPIFFE ID
        self._xfcc: dict[int, tuple] = {}  # id(inbound route config) -> (XFCC mode, details, its pod's ID)

    def add(self, lsn: Listener, crc: Any = None) -> None:
        """A listener of the snapshot; `crc`: its compiled route config (HTTP listeners)."""
        if lsn.workload_principal:  # host prefixes only: a workload's own addresses
            self._principals.update((str(p.ip), lsn.workload_principal) for p in lsn.sources or lsn.prefixes
                                    if p.prefixlen == (32 if p.version == 4 else 128))  # fmt: skip
        if crc is not None and not lsn.sources and lsn.forward_client_cert in ("append_forward", "sanitize_set"):
            self._xfcc.setdefault(id(crc), (lsn.forward_client_cert, lsn.client_cert_details,
                                            lsn.workload_principal or None))  # fmt: skip

    def __bool__(self) -> bool:
        return bool(self._principals)

    def principal(self, ip: str) -> str | None:
        """The SPIFFE ID of the local workload at `ip`, None: no local workload holds it."""
        principals = self._principals
        found = principals.get(ip)  # the usual form (connections give it normalised): no parse per request
        if found is not None or not principals:
            return found
        try:
            return principals.get(_ip(ip))
        except (AddrFormatError, ValueError, TypeError):
            return None

    def sets_xfcc(self) -> bool:
        return bool(self._xfcc)

    def xfcc(self, inbound: Any, client: str | None) -> bytes | None:
        """The x-forwarded-client-cert the local server pod's inbound chain `inbound` would set for a same-node
        client of SPIFFE ID `client` (local_inbound.xfcc_element), None: none."""
        found = self._xfcc.get(id(inbound)) if inbound is not None and client is not None else None
        return xfcc_element(found[0], found[1], found[2], client) if found is not None else None
