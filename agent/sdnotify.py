"""Service lifecycle: the sd_notify protocol, the watchdog, and readiness as a set of named blockers.

sd_notify is one unix datagram per state change to `$NOTIFY_SOCKET` (a path, or an abstract name written
with a leading `@`). Without `NOTIFY_SOCKET` (not under systemd, or under Kubernetes) every call is a no-op.
Notification never raises: failing to tell systemd something must not take the data path down with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

# The blockers the daemon starts with; it clears each one when that part of the node is in place.
PROGRAMS_ATTACHED = "programs attached"
ROUTES_INSTALLED = "routes installed"
LISTENERS_BOUND = "listeners bound"
FIRST_SNAPSHOT_APPLIED = "first snapshot applied"
DEFAULT_BLOCKERS = (PROGRAMS_ATTACHED, ROUTES_INSTALLED, LISTENERS_BOUND, FIRST_SNAPSHOT_APPLIED)


def _socket_address(spec: str) -> str | bytes:
    # Abstract namespace sockets are spelled "@name" in the environment and "\0name" on the wire.
    if spec.startswith("@"):
        return b"\0" + spec[1:].encode()
    return spec


class Notifier:
    """A client for systemd's notification socket. Thread-safe; all methods return whether it was sent."""

    def __init__(self, socket_spec: str | None = None, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        spec = socket_spec if socket_spec is not None else env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(spec) if spec else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    # Non-blocking: a receiver whose queue is full (systemd busy or hung) must never stall
                    # the event loop; that datagram is dropped and the next ping tries again.
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                    )
                self._sock.sendto(payload, self._address)
            except BlockingIOError:
                return False
            except OSError as exc:
                if not self._warned:  # once: a missing systemd must not flood the log at watchdog rate
                    log.warning("sd_notify to %r failed: %s", self._address, exc)
                    self._warned = True
                return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []), f"MAINPID={os.getpid()}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # systemd < 253 ignores RELOADING=1; harmless, and Type=notify-reload units need it.
        return self.notify("RELOADING=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text.replace(chr(10), ' ')}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_interval_s(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between pings (half of `WATCHDOG_USEC`), or None when no watchdog is asked for us."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", env.get("WATCHDOG_USEC"))
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid and watchdog_pid != str(os.getpid() if pid is None else pid):
        return None  # the watchdog is meant for another process (e.g. our parent)
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


async def run_watchdog(
    notifier: Notifier,
    is_healthy: Callable[[], bool],
    interval_s: float | None = None,
) -> None:
    """Ping the watchdog every `interval_s` (default: half of WATCHDOG_USEC) while `is_healthy()` holds.

    Runs until cancelled; the daemon runs it in its task group. When unhealthy it stops pinging, so
    systemd restarts us after WatchdogSec: a wedged data-path manager is worse than a restart (the TC
    programs stay attached and the pinned maps are re-adopted).
    """
    interval = watchdog_interval_s() if interval_s is None else interval_s
    if interval is None or not notifier.enabled:
        return
    unhealthy_logged = False
    while True:
        try:
            healthy = bool(is_healthy())
        except Exception:
            log.exception("liveness check raised; treating as unhealthy")
            healthy = False
        if healthy:
            notifier.watchdog()
            unhealthy_logged = False
        elif not unhealthy_logged:
            log.error("liveness check failed: withholding watchdog pings")
            unhealthy_logged = True
        await asyncio.sleep(interval)


class Readiness:
    """Ready when no named blocker remains. Thread-safe; callbacks run once, on the transition to ready."""

    def __init__(self, blockers: Iterable[str] = DEFAULT_BLOCKERS) -> None:
        self._blockers: set[str] = set(blockers)
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._fired = False

    @property
    def blockers(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._blockers))

    @property
    def ready(self) -> bool:
        with self._lock:
            return not self._blockers

    def block(self, name: str) -> None:
        """Add a blocker (a component that lost its footing, or one registered late)."""
        with self._lock:
            self._blockers.add(name)

    def clear(self, name: str) -> None:
        """Remove a blocker; clearing one that is not there is fine (idempotent re-apply)."""
        with self._lock:
            self._blockers.discard(name)
            fire = not self._blockers and not self._fired
            if fire:
                self._fired = True
            callbacks, self._callbacks = (self._callbacks, []) if fire else ([], self._callbacks)
        for callback in callbacks:
            callback()

    def on_ready(self, callback: Callable[[], None]) -> None:
        """Call `callback` the first time the blocker set becomes empty (at once if it already is)."""
        with self._lock:
            fire_now = not self._blockers
            if fire_now:
                self._fired = True
            else:
                self._callbacks.append(callback)
        if fire_now:
            callback()

    async def wait(self, poll_s: float = 0.05) -> None:
        """Wait until ready (polling keeps this safe to clear from any thread)."""
        while not self.ready:
            await asyncio.sleep(poll_s)
