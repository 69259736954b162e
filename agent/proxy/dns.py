"""STRICT_DNS / LOGICAL_DNS clusters: when to resolve which host, and the endpoints the answers make.

Sans-IO: `DnsRefresh` only keeps the schedule and the answers; agent/proxy/dns_resolver.py asks the system
resolver and feeds them in. A worker keeps one `DnsRefresh` across snapshots (a cluster whose hosts did not
change keeps its addresses and its timer); the Balancer reads the endpoints of a DNS cluster from it, so a new
answer changes where requests go without a new snapshot.

Envoy's behaviour kept here: every cluster resolves once at once, then every `dns_refresh_rate`
(`dns_failure_refresh_rate` after a failed lookup); a failed lookup keeps the host's previous addresses;
STRICT_DNS uses every address of every host, LOGICAL_DNS the first address of its one host; the family
decides which addresses count (AUTO: v6 if there are any, else v4).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping

from planemesh.model.config import Cluster, ClusterKind, DnsSettings, Endpoint


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def by_family(addresses: Iterable[str], family: str) -> list[str]:
    """The answers that count for dns_lookup_family, in order, without repeats."""
    seen: list[str] = []
    for a in addresses:
        if a not in seen:
            seen.append(a)
    v4 = [a for a in seen if ":" not in a]
    v6 = [a for a in seen if ":" in a]
    if family == "v4":
        return v4
    if family == "v6":
        return v6
    if family == "auto":
        return v6 or v4
    if family == "v4_preferred":
        return v4 or v6
    return seen  # all


@dataclasses.dataclass(slots=True)
class _State:
    settings: DnsSettings
    kind: ClusterKind
    due: float  # next lookup (monotonic)
    addresses: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # host -> last good answer
    pending: bool = False
    generation: int = 0
    endpoints: tuple[Endpoint, ...] = ()
    failures: int = 0  # lookups that failed (for stats and tests)


class DnsRefresh:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[str, _State] = {}

    def sync(self, clusters: Mapping[str, Cluster]) -> None:
        """Follow a new snapshot: new DNS clusters are due now, unchanged ones keep their answers and timer."""
        now = self._clock()
        states: dict[str, _State] = {}
        for name, c in clusters.items():
            if c.dns is None:
                continue
            old = self._states.get(name)
            if old is not None and old.settings.hosts == c.dns.hosts and old.kind is c.kind:
                old.settings = c.dns
                states[name] = old
                continue
            state = _State(c.dns, c.kind, due=now)
            for h in c.dns.hosts:  # IP literals need no lookup
                if is_ip(h.address):
                    state.addresses[h.address] = (h.address,)
            self._rebuild(state)
            states[name] = state
        self._states = states

    def due(self) -> list[tuple[str, tuple[str, ...]]]:
        """(cluster, host names to resolve) for each cluster whose time has come; they are now pending."""
        now = self._clock()
        out = []
        for name, st in self._states.items():
            if st.pending or st.due > now:
                continue
            names = tuple(dict.fromkeys(h.address for h in st.settings.hosts if not is_ip(h.address)))
            if not names:
                st.due = float("inf")  # only IP literals: nothing ever changes
                continue
            st.pending = True
            out.append((name, names))
        return out

    def next_due(self) -> float | None:
        """The earliest time a cluster is due (None: nothing to resolve, ever)."""
        times = [st.due for st in self._states.values() if not st.pending and st.due != float("inf")]
        return min(times) if times else None

    def resolved(self, cluster: str, answers: Mapping[str, Iterable[str] | None]) -> bool:
        """The answers of one due cluster: host -> addresses, None for a failed lookup (the host keeps its
        previous addresses). True when the cluster's endpoints changed."""
        st = self._states.get(cluster)
        if st is None or not st.pending:
            return False  # the cluster went away (or changed hosts) while its lookup ran
        st.pending = False
        failed = False
        for host, addrs in answers.items():
            got = by_family(addrs, st.settings.family) if addrs is not None else []
            if not got:
                failed = True
                st.failures += 1
                continue
            st.addresses[host] = tuple(got)
        wait = st.settings.refresh_s
        if failed and st.settings.failure_refresh_s is not None:
            wait = st.settings.failure_refresh_s
        st.due = self._clock() + wait
        return self._rebuild(st)

    def _rebuild(self, st: _State) -> bool:
        eps: list[Endpoint] = []
        for h in st.settings.hosts:
            addrs = st.addresses.get(h.address, ())
            if st.kind is ClusterKind.LOGICAL_DNS:
                addrs = addrs[:1]
            eps += [dataclasses.replace(h, address=a) for a in addrs]
        new = tuple(eps)
        if new == st.endpoints:
            return False
        st.endpoints = new
        st.generation += 1
        return True

    def endpoints(self, cluster: str) -> tuple[tuple[Endpoint, ...], int] | None:
        """(endpoints, generation) of a DNS cluster, None for a cluster this does not follow."""
        st = self._states.get(cluster)
        return (st.endpoints, st.generation) if st is not None else None

    def failures(self, cluster: str) -> int:
        st = self._states.get(cluster)
        return st.failures if st is not None else 0
