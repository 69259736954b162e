"""The ADS stream over grpc.aio, driving the sans-IO AdsClientState; the integrator's XdsClient.

    client = XdsClient(load_bootstrap(path), apply=agent.apply_snapshot)
    await client.run()          # forever: connect, follow updates, reconnect with jittered backoff
    client.status()             # versions per type, ACK/NACK counts, last error (admin endpoint)

`apply(snapshot)` raising ConfigError NACKs the update; the previous configuration stays. Losing the
server changes nothing that is serving: the last applied snapshot stays until a new one is ACKed (only
resources the server gave a TTL expire, as the protocol asks).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from google.protobuf import struct_pb2

from planemesh.agent.config import ConfigError, Snapshot
from planemesh.xds.bootstrap import Bootstrap
from planemesh.xds.client_state import Action, AdsClientState, ApplyConfig, Mode, SendRequest
from planemesh.xds.translate import TranslationCache, translate

USER_AGENT = "planemesh"
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


class Backoff:
    """Exponential backoff with jitter (half fixed, half random), so restarted nodes do not stampede."""

    def __init__(self, base_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.base_s, self.max_s = base_s, max_s
        self.rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        cap = min(self.max_s, self.base_s * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return cap / 2 + self.rng.uniform(0, cap / 2)

    def reset(self) -> None:
        self.attempt = 0


def node_identity(bootstrap: Bootstrap) -> base_pb2.Node:
    """node.id, node.cluster, and metadata `planemesh.planes`: what a control plane needs to address us."""
    planes = [
        {
            "name": p.name,
            "id": p.plane_id,
            "interfaces": list(p.interfaces),
            "cidrs": [str(c) for c in p.cidrs],
        }
        for p in bootstrap.planes
    ]
    metadata = struct_pb2.Struct()
    metadata.update({"planemesh.planes": planes, "planemesh.version": "0.1.0"})
    return base_pb2.Node(id=bootstrap.node_id, cluster=bootstrap.cluster, metadata=metadata, user_agent_name=USER_AGENT)


def make_channel(bootstrap: Bootstrap) -> grpc.aio.Channel:
    if bootstrap.tls is None:
        return grpc.aio.insecure_channel(bootstrap.server, options=CHANNEL_OPTIONS)
    tls = bootstrap.tls
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(tls.ca).read_bytes(),
        private_key=Path(tls.key).read_bytes() if tls.key else None,
        certificate_chain=Path(tls.cert).read_bytes() if tls.cert else None,
    )
    options = list(CHANNEL_OPTIONS)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(bootstrap.server, creds, options=options)


_EOF = object()


class XdsClient:
    def __init__(
        self,
        bootstrap: Bootstrap,
        apply: Callable[[Snapshot], Awaitable[None]],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self._apply = apply
        self._clock = clock
        self._sleep = sleep
        self.state = AdsClientState(
            node_identity(bootstrap), bootstrap.mode, initial_fetch_timeout_s=bootstrap.initial_fetch_timeout_s
        )
        self.backoff = Backoff(bootstrap.backoff_base_s, bootstrap.backoff_max_s, rng)
        self.snapshot: Snapshot | None = None
        self.streams = 0
        self.last_error: str | None = None
        self.applied = asyncio.Event()  # set after every applied snapshot (tests and readiness)
        self.translation_cache = TranslationCache()  # unchanged resources are not translated again

    # ---- readable state --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        from planemesh.xds.resources import SHORT_NAME

        return {
            "server": self.bootstrap.server,
            "mode": str(self.bootstrap.mode),
            "connected": self.state.connected,
            "streams": self.streams,
            "snapshot_version": self.snapshot.version if self.snapshot else None,
            "last_error": self.last_error or self.state.last_error,
            "types": {
                SHORT_NAME[t.type_url]: {
                    "version": t.version,
                    "nonce": t.nonce,
                    "resources": t.resources,
                    "subscribed": list(t.subscribed),
                    "acks": t.acks,
                    "nacks": t.nacks,
                    "last_error": t.last_error,
                }
                for t in self.state.status()
            },
        }

    def stats_report(self) -> dict[str, Any]:
        """The admin/metrics provider (agent/metrics.py's StatsReport as a dict): per type URL."""
        rows = [
            {"type_url": t.type_url, "version": t.version, "acks": t.acks, "nacks": t.nacks, "resources": t.resources}
            for t in self.state.status()
        ]
        return {"xds": rows, "xds_connected": self.state.connected}

    # ---- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever. Exceptions other than the server's (a consumer bug) propagate to the caller."""
        while True:
            try:
                await self._one_stream()
                self.last_error = "server closed the stream"
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
            self.state.stream_reset(self._clock())
            await self._wait(self.backoff.next_delay())

    async def _wait(self, delay: float) -> None:
        """Sleep through the backoff, still firing timers (TTL expiry needs no server)."""
        end = self._clock() + delay
        while (now := self._clock()) < end:
            deadline = self.state.next_deadline()
            if deadline is not None and deadline <= now:
                await self._execute(None, self.state.timer_fired(now))
                continue
            await self._sleep(min(end, deadline or end) - now)

    async def _one_stream(self) -> None:
        async with make_channel(self.bootstrap) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            if self.bootstrap.mode is Mode.DELTA:
                call = stub.DeltaAggregatedResources()
            else:
                call = stub.StreamAggregatedResources()
            queue: asyncio.Queue[Any] = asyncio.Queue()
            reader = asyncio.create_task(self._read(call, queue))
            self.streams += 1
            try:
                await self._execute(call, self.state.stream_started(self._clock()))
                while True:
                    deadline = self.state.next_deadline()
                    timeout = None if deadline is None else max(0.0, deadline - self._clock())
                    try:
                        item = await asyncio.wait_for(queue.get(), timeout)
                    except TimeoutError:
                        await self._execute(call, self.state.timer_fired(self._clock()))
                        continue
                    if item is _EOF:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    self.backoff.reset()  # the server answered: next outage starts from the base delay
                    await self._execute(call, self.state.response_received(item, self._clock()))
            finally:
                reader.cancel()
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await reader

    @staticmethod
    async def _read(call: Any, queue: asyncio.Queue[Any]) -> None:
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    await queue.put(_EOF)
                    return
                await queue.put(msg)
        except grpc.aio.AioRpcError as exc:
            await queue.put(exc)

    async def _execute(self, call: Any, actions: list[Action]) -> None:
        work = list(actions)
        while work:
            action = work.pop(0)
            if isinstance(action, SendRequest):
                if call is not None:
                    await call.write(action.request)
            elif isinstance(action, ApplyConfig):
                error = await self._apply_resources(action)
                work += self.state.apply_result(action.token, error, self._clock())

    async def _apply_resources(self, action: ApplyConfig) -> ConfigError | None:
        try:
            snapshot = translate(action.resources, self.bootstrap.planes, self.translation_cache)
            await self._apply(snapshot)
        except ConfigError as exc:
            self.last_error = str(exc)
            return exc
        self.snapshot = snapshot
        self.last_error = None
        self.applied.set()
        return None
