"""Load-balancing policies over one cluster's endpoints, pure (no I/O, randomness injectable).

    lb = ClusterLb(cluster, rng=random.Random(1))
    ep = lb.pick(hash_key=hash64(b"user-42"), available=lambda ep: not detector.is_ejected(ep))

Endpoints are grouped by EDS priority; a pick uses the lowest priority that has an available (healthy,
not ejected) endpoint, as Envoy does with overprovisioning at 100%. Within a level the cluster's policy
decides: round robin (smooth weighted), least request (power of two choices), random (weighted), ring hash
or Maglev (consistent: when one of N endpoints leaves, about 1/N of the keys move).

A locality-weighted cluster first picks a locality of the level, as Envoy does: effective weight = the
locality's EDS weight x min(1, 1.4 x its available share of endpoints), smooth weighted round robin over
those (exact shares, recomputed per pick so ejections shift load at once); then the policy within the
locality. A locality without a weight gets nothing; when no locality has an effective weight the whole
level is used.
"""

from __future__ import annotations

import bisect
import random
from _blake2 import blake2b  # hashlib's own blake2b: hashlib would map OpenSSL's libcrypto (~3.4 MB RSS)
from collections.abc import Callable, Sequence

from planemesh.model.config import Cluster, Endpoint, LbPolicy

Available = Callable[[Endpoint], bool]
RING_VNODES_PER_WEIGHT = 160  # ketama's count; fixed per endpoint so a leaving endpoint moves only its keys
MAGLEV_TABLE_SIZE = 5003  # prime; Envoy uses 65537, this is enough for small clusters and builds in ms
OVERPROVISIONING = 1.4  # Envoy's default overprovisioning_factor (140): a locality keeps its full weight at >= 71%


def hash64(data: bytes) -> int:
    """A stable 64-bit hash (identical across processes, unlike hash())."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def endpoint_key(ep: Endpoint) -> bytes:
    return f"{ep.address}:{ep.port}".encode()


def _always(ep: Endpoint) -> bool:
    return True


class Picker:
    """One policy over one priority level's endpoints."""

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random) -> None:
        self.endpoints = tuple(endpoints)
        self.rng = rng

    def pick(self, hash_key: int | None, available: Available) -> Endpoint | None:
        raise NotImplementedError

    def _weighted_random(self, available: Available) -> Endpoint | None:
        candidates = [ep for ep in self.endpoints if available(ep)]
        if not candidates:
            return None
        return self.rng.choices(candidates, weights=[max(1, ep.weight) for ep in candidates])[0]


def smooth_weighted_sequence(weights: Sequence[int], max_len: int = 4096) -> list[int]:
    """nginx's smooth weighted round robin unrolled once: indexes, each appearing `weight` times, spread out."""
    w = [max(1, x) for x in weights]
    total = sum(w)
    if total > max_len:  # scale down, keeping every endpoint at least once
        w = [max(1, x * max_len // total) for x in w]
        total = sum(w)
    current = [0] * len(w)
    out: list[int] = []
    for _ in range(total):
        for i, x in enumerate(w):
            current[i] += x
        best = max(range(len(w)), key=current.__getitem__)
        current[best] -= total
        out.append(best)
    return out


class RoundRobin(Picker):
    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random) -> None:
        super().__init__(endpoints, rng)
        self.sequence = smooth_weighted_sequence([ep.weight for ep in self.endpoints]) if self.endpoints else []
        self.cursor = 0

    def pick(self, hash_key: int | None, available: Available) -> Endpoint | None:
        seq = self.sequence
        if available is _always and seq:  # no outlier detection: the next in the sequence
            cursor = self.cursor
            self.cursor = cursor + 1
            return self.endpoints[seq[cursor % len(seq)]]
        for _ in range(len(seq)):
            ep = self.endpoints[seq[self.cursor % len(seq)]]
            self.cursor += 1
            if available(ep):
                return ep
        return None


class RandomPick(Picker):
    def pick(self, hash_key: int | None, available: Available) -> Endpoint | None:
        return self._weighted_random(available)


class LeastRequest(Picker):
    """Power of two choices on active requests divided by weight (`active` is kept by the caller)."""

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random, active: dict[Endpoint, int]) -> None:
        super().__init__(endpoints, rng)
        self.active = active

    def pick(self, hash_key: int | None, available: Available) -> Endpoint | None:
        candidates = [ep for ep in self.endpoints if available(ep)]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        a, b = self.rng.sample(candidates, 2)
        load_a = self.active.get(a, 0) / max(1, a.weight)
        load_b = self.active.get(b, 0) / max(1, b.weight)
        return a if load_a <= load_b else b


class RingHash(Picker):
    """Ketama-style ring: each endpoint gets virtual nodes in proportion to its weight."""

    def __init__(
        self, endpoints: Sequence[Endpoint], rng: random.Random, vnodes_per_weight: int = RING_VNODES_PER_WEIGHT
    ) -> None:
        super().__init__(endpoints, rng)
        ring: list[tuple[int, int]] = []
        for i, ep in enumerate(self.endpoints):
            key = endpoint_key(ep)
            for n in range(vnodes_per_weight * min(max(1, ep.weight), 128)):
                ring.append((hash64(key + b"_%d" % n), i))
        ring.sort()
        self.hashes = [h for h, _ in ring]
        self.owners = [i for _, i in ring]

    def pick(self, hash_key: int | None, available: Available) -> Endpoint | None:
        if not self.hashes:
            return None
        if hash_key is None:
            return self._weighted_random(available)
        start = bisect.bisect_left(self.hashes, hash_key)
        n = len(self.hashes)
        for step in range(n):  # walk clockwise past unavailable endpoints
            ep = self.endpoints[self.owners[(start + step) % n]]
            if available(ep):
                return ep
        return None


class Maglev(Picker):
    """Maglev lookup table (Eisenbud et al. 2016), weighted by letting heavier endpoints fill more often."""

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random, size: int = MAGLEV_TABLE_SIZE) -> None:
        super().__init__(endpoints, rng)
        self.table: list[int] = build_maglev_table(
            [endpoint_key(ep) for ep in self.endpoints], [ep.weight for ep in self.endpoints], size
        )

    def pick(self, hash_key: int | None, available: Available) -> Endpoint | None:
        table = self.table
        if not table:
            return None
        if hash_key is None:
            return self._weighted_random(available)
        start = hash_key % len(table)
        for step in range(len(table)):  # unavailable: the next slot's owner (bounded by the table)
            ep = self.endpoints[table[(start + step) % len(table)]]
            if available(ep):
                return ep
        return None


def build_maglev_table(keys: Sequence[bytes], weights: Sequence[int], size: int) -> list[int]:
    if not keys:
        return []
    n = len(keys)
    offsets = [hash64(b"o" + k) % size for k in keys]
    skips = [hash64(b"s" + k) % (size - 1) + 1 for k in keys]
    w = [max(1, x) for x in weights]
    max_w = max(w)
    nexts = [0] * n
    credit = [0.0] * n
    table = [-1] * size
    filled = 0
    while True:
        for i in range(n):
            credit[i] += w[i] / max_w
            if credit[i] < 1:
                continue
            credit[i] -= 1
            slot = (offsets[i] + nexts[i] * skips[i]) % size
            while table[slot] >= 0:
                nexts[i] += 1
                slot = (offsets[i] + nexts[i] * skips[i]) % size
            table[slot] = i
            nexts[i] += 1
            filled += 1
            if filled == size:
                return table


def make_picker(
    policy: LbPolicy, endpoints: Sequence[Endpoint], rng: random.Random, active: dict[Endpoint, int]
) -> Picker:
    if policy is LbPolicy.LEAST_REQUEST:
        return LeastRequest(endpoints, rng, active)
    if policy is LbPolicy.RANDOM:
        return RandomPick(endpoints, rng)
    if policy is LbPolicy.RING_HASH:
        return RingHash(endpoints, rng)
    if policy is LbPolicy.MAGLEV:
        return Maglev(endpoints, rng)
    return RoundRobin(endpoints, rng)


class _Locality:
    __slots__ = ("current", "picker", "total", "weight")

    def __init__(self, picker: Picker, weight: int, total: int) -> None:
        self.picker = picker
        self.weight = weight
        self.total = total  # endpoints in EDS, healthy or not: the denominator of the healthy share
        self.current = 0.0  # smooth weighted round robin state


class LocalityWeighted(Picker):
    """One priority level of a locality-weighted cluster: a locality by effective weight, then its policy."""

    def __init__(self, localities: Sequence[tuple[Picker, int, int]], rng: random.Random, whole_level: Picker) -> None:
        super().__init__(whole_level.endpoints, rng)
        self.localities = [_Locality(p, w, t) for p, w, t in localities if w > 0 and p.endpoints]
        self.whole_level = whole_level

    def effective_weights(self, available: Available) -> list[float]:
        """Envoy's effective locality weight: weight x min(1, overprovisioning x available share)."""
        out = []
        for loc in self.localities:
            up = sum(1 for ep in loc.picker.endpoints if available(ep))
            out.append(loc.weight * min(1.0, OVERPROVISIONING * up / loc.total))
        return out

    def pick(self, hash_key: int | None, available: Available) -> Endpoint | None:
        weights = self.effective_weights(available)
        total = sum(weights)
        if total <= 0:  # no locality can take traffic: Envoy falls back to the level's hosts
            return self.whole_level.pick(hash_key, available)
        best = None
        for loc, w in zip(self.localities, weights, strict=True):
            if w > 0:
                loc.current += w
                if best is None or loc.current > best.current:
                    best = loc
        assert best is not None
        best.current -= total
        return best.picker.pick(hash_key, available)


def make_level(
    cluster: Cluster,
    endpoints: Sequence[Endpoint],
    totals: dict[str, int],
    rng: random.Random,
    active: dict[Endpoint, int],
) -> Picker:
    """The picker of one priority level: the cluster's policy, under a locality pick when locality weighted."""
    whole = make_picker(cluster.lb_policy, endpoints, rng, active)
    if not cluster.locality_weighted:
        return whole
    groups: dict[str, list[Endpoint]] = {}
    for ep in endpoints:
        groups.setdefault(ep.locality, []).append(ep)
    localities = [
        (make_picker(cluster.lb_policy, group, rng, active), group[0].locality_weight, totals[name])
        for name, group in groups.items()
    ]
    return LocalityWeighted(localities, rng, whole)


class ClusterLb:
    """A cluster's pickers per priority level plus the active-request counts least request needs."""

    def __init__(self, cluster: Cluster, rng: random.Random | None = None) -> None:
        self.cluster = cluster
        self.rng = rng or random.Random()
        self.active: dict[Endpoint, int] = {}
        # Only least request reads the counts: other policies skip them (an Endpoint's hash is a Python call).
        self.counts = cluster.lb_policy is LbPolicy.LEAST_REQUEST
        levels: dict[int, list[Endpoint]] = {}
        totals: dict[int, dict[str, int]] = {}  # priority -> locality -> endpoints in EDS (healthy or not)
        for ep in cluster.endpoints:
            per_level = totals.setdefault(ep.priority, {})
            per_level[ep.locality] = per_level.get(ep.locality, 0) + 1
            if ep.healthy:
                levels.setdefault(ep.priority, []).append(ep)
        self.levels = [make_level(cluster, levels[p], totals[p], self.rng, self.active) for p in sorted(levels)]

    def pick(self, hash_key: int | None = None, available: Available = _always) -> Endpoint | None:
        """An endpoint of the lowest priority level with an available endpoint; None when there is none."""
        if available is _always:  # no outlier detection: the first level with an endpoint
            for level in self.levels:
                if level.endpoints:
                    return level.pick(hash_key, available)
            return None
        for level in self.levels:
            if any(available(ep) for ep in level.endpoints):
                return level.pick(hash_key, available)
        return None

    def started(self, ep: Endpoint) -> None:
        if self.counts:
            self.active[ep] = self.active.get(ep, 0) + 1

    def ended(self, ep: Endpoint) -> None:
        if not self.counts:
            return
        n = self.active.get(ep, 0) - 1
        if n > 0:
            self.active[ep] = n
        else:
            self.active.pop(ep, None)
