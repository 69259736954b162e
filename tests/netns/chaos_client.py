"""The chaos test's pieces: a client that checks every body by SHA-256, and the attribution of its errors to
the faults that were active (pure logic, so the verdict is easy to read and to test)."""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import threading
import time
from dataclasses import dataclass, field

from planemesh.labs.servers import pattern_bytes
from planemesh.labs.traffic import host_port

REQUEST_TIMEOUT_S = 5.0
MAX_REQUESTS = 50_000  # per client: bounded in count as well as in time
PAUSE_S = 0.005  # between requests: leaves CPU to the agent and to the other tests on a small machine


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None  # None: no response (connection error, timeout)
    error: str = ""  # empty: a 2xx whose body checked out


@dataclass
class ClientLog:
    plane: str
    outcomes: list[Outcome] = field(default_factory=list)
    corrupted: list[str] = field(default_factory=list)  # a 2xx whose body did not match: never allowed
    crashed: str = ""  # the client itself failed (a bug in the test): the run proves nothing

    @property
    def ok(self) -> int:
        return sum(1 for o in self.outcomes if not o.error)

    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error]


def _sha256_field(data: bytes) -> str | None:
    try:
        answer = json.loads(data)
    except ValueError:
        return None
    return answer.get("sha256") if isinstance(answer, dict) else None


def _one(conn: http.client.HTTPConnection, rng: random.Random, log: ClientLog) -> None:
    """POST a random body to /sha256 or GET /big of a random size; check what came back."""
    size = rng.randrange(1, 256 << 10)
    if rng.random() < 0.5:
        body = rng.randbytes(size)
        conn.request("POST", "/sha256", body=body, headers={"content-type": "application/octet-stream"})
        resp = conn.getresponse()
        data = resp.read()
        want = hashlib.sha256(body).hexdigest()
        got = _sha256_field(data) if 200 <= resp.status < 300 else None
        what = f"POST /sha256 of {size} bytes"
    else:
        conn.request("GET", f"/big?size={size}")
        resp = conn.getresponse()
        data = resp.read()
        want = hashlib.sha256(pattern_bytes(size)).hexdigest()
        got = hashlib.sha256(data).hexdigest()
        what = f"GET /big of {size} bytes (got {len(data)})"
    if 200 <= resp.status < 300 and got != want:
        log.corrupted.append(f"{what}: sha256 {got} != {want}")
    if resp.status != 200:
        raise http.client.HTTPException(f"status {resp.status}")


def run_client(address: str, port: int, stop: threading.Event, seed: int, log: ClientLog) -> None:
    """Requests one after another until `stop` (or MAX_REQUESTS), reconnecting after any error."""
    try:
        _run(address, port, stop, seed, log)
    except BaseException as exc:
        log.crashed = repr(exc)


def _run(address: str, port: int, stop: threading.Event, seed: int, log: ClientLog) -> None:
    rng = random.Random(seed)
    conn: http.client.HTTPConnection | None = None
    while not stop.is_set() and len(log.outcomes) < MAX_REQUESTS:
        conn = conn or http.client.HTTPConnection(address, port, timeout=REQUEST_TIMEOUT_S)
        started = time.monotonic()
        try:
            _one(conn, rng, log)
            log.outcomes.append(Outcome(started, time.monotonic(), 200))
            time.sleep(PAUSE_S)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            log.outcomes.append(Outcome(started, time.monotonic(), None, f"{type(exc).__name__}: {exc}"))
            conn.close()
            conn = None
            time.sleep(0.05)
    if conn is not None:
        conn.close()


def url(address: str, port: int) -> str:
    return f"http://{host_port(address, port)}"


@dataclass
class Fault:
    kind: str
    plane: str | None  # None: node-wide
    started: float
    ended: float = 0.0
    may_fail: bool = True  # node-wide faults that must cause no error at all say False
    marks: dict[str, float] = field(default_factory=dict)  # moments inside the fault, for the report

    def covers(self, outcome: Outcome, grace_s: float) -> bool:
        return outcome.started <= self.ended + grace_s and outcome.ended >= self.started


def unexplained(log: ClientLog, faults: list[Fault], grace_s: float) -> list[tuple[Outcome, list[str]]]:
    """Errors of `log`'s plane that no fault of that plane (or node-wide fault allowed to fail) explains,
    with the faults that were active then (for the message)."""
    out = []
    for outcome in log.errors():
        active = [f for f in faults if f.covers(outcome, grace_s)]
        if not any(f.may_fail and f.plane in (log.plane, None) for f in active):
            out.append((outcome, [f"{f.kind}@{f.plane} {_offsets(f, outcome)}" for f in active]))
    return out


def by_fault(log: ClientLog, faults: list[Fault], grace_s: float) -> dict[str, int]:
    """How many of `log`'s errors each kind of fault of its plane (or node-wide) overlapped, for the report."""
    counts: dict[str, int] = {}
    for outcome in log.errors():
        for kind in sorted({f.kind for f in faults if f.plane in (log.plane, None) and f.covers(outcome, grace_s)}):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _offsets(fault: Fault, outcome: Outcome) -> str:
    """When the failed request started, relative to the fault's start and marks (seconds)."""
    points = {"start": fault.started, **fault.marks, "end": fault.ended}
    return " ".join(f"{name}{outcome.started - t:+.3f}" for name, t in points.items())
