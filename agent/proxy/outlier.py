"""Outlier detection for one cluster, pure with an injectable clock (Envoy's consecutive_5xx and
consecutive_gateway_failure detectors, ejection back-off and max_ejection_percent).

An endpoint that answers `consecutive_5xx` 5xx in a row (or `consecutive_gateway_failure` 502/503/504 or
connect failures/resets/timeouts) is ejected for base_ejection_time x (number of times ejected), unless that
would eject more than max_ejection_percent of the cluster. It returns by itself once the time has passed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

from planemesh.model.config import OutlierDetection

GATEWAY_FAILURE = 0  # report() status for a connect failure, reset before headers or timeout
_GATEWAY_STATUSES = frozenset({GATEWAY_FAILURE, 502, 503, 504})


class _HostState:
    __slots__ = ("consecutive_5xx", "consecutive_gateway", "ejected_until", "times_ejected")

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.ejected_until = 0.0
        self.times_ejected = 0


class OutlierDetector:
    def __init__(self, config: OutlierDetection, host_count: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.host_count = max(1, host_count)
        self.clock = clock
        self.hosts: dict[Hashable, _HostState] = {}
        self.ejections_total = 0

    def is_ejected(self, host: Hashable) -> bool:
        state = self.hosts.get(host)
        if state is None or not state.ejected_until:
            return False
        if self.clock() >= state.ejected_until:
            state.ejected_until = 0.0  # back in rotation; the counters start afresh
            state.consecutive_5xx = state.consecutive_gateway = 0
            return False
        return True

    def ejected_count(self) -> int:
        return sum(1 for host in list(self.hosts) if self.is_ejected(host))

    def report(self, host: Hashable, status: int) -> bool:
        """One attempt's outcome: an HTTP status, or GATEWAY_FAILURE. True when this report ejected the host."""
        state = self.hosts.get(host)
        if state is None:
            state = self.hosts[host] = _HostState()
        if status != GATEWAY_FAILURE and status < 500:
            state.consecutive_5xx = state.consecutive_gateway = 0
            return False
        state.consecutive_5xx += 1
        if status in _GATEWAY_STATUSES:
            state.consecutive_gateway += 1
        else:
            state.consecutive_gateway = 0
        cfg = self.config
        tripped = (cfg.consecutive_5xx > 0 and state.consecutive_5xx >= cfg.consecutive_5xx) or (
            cfg.consecutive_gateway_failure > 0 and state.consecutive_gateway >= cfg.consecutive_gateway_failure)
        if not tripped or self.is_ejected(host):
            return False
        # Envoy: eject while the ejected share is below the maximum (so one host of a small cluster may go).
        if self.ejected_count() * 100 >= cfg.max_ejection_percent * self.host_count:
            return False
        state.times_ejected += 1
        state.ejected_until = self.clock() + cfg.base_ejection_time_s * state.times_ejected
        state.consecutive_5xx = state.consecutive_gateway = 0
        self.ejections_total += 1
        return True
