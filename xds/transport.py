"""The ADS stream over grpc.aio, driving the sans-IO AdsClientState; the integrator's XdsClient.

    client = XdsClient(load_bootstrap(path), apply=agent.apply_snapshot)
    await client.run()          # forever: connect, follow updates, reconnect with jittered backoff
    client.status()             # versions per type, ACK/NACK counts, last error (admin endpoint)

Every valid resource is applied and only the bad ones are NACKed (xds/per_resource.py); `apply(snapshot)`
raising ConfigError NACKs the whole update and the previous configuration stays. Losing the
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

from planemesh.agent.config import ConfigError, Listener, Snapshot
from planemesh.xds.bootstrap import Bootstrap
from planemesh.xds.client_state import Action, AdsClientState, ApplyConfig, Mode, SendRequest
from planemesh.xds.per_resource import Rejected, translate_update
from planemesh.xds.translate import TranslationCache

USER_AGENT = "planemesh"
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
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
    metadata.update(dict(bootstrap.node_metadata))  # istiod's keys (ISTIO_VERSION, NAMESPACE...) from the bootstrap
    metadata.update({"planemesh.planes": planes, "planemesh.version": "0.1.0"})
    return base_pb2.Node(id=bootstrap.node_id, cluster=bootstrap.cluster, metadata=metadata, user_agent_name=USER_AGENT)


class CredentialsError(Exception):
    """A credential file (CA, client cert/key, token) cannot be read: retried with backoff, reported."""


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{field} {path}: cannot read: {exc.strerror}") from None


def call_metadata(bootstrap: Bootstrap) -> tuple[tuple[str, str], ...] | None:
    """`authorization: Bearer <JWT>` as istio-agent sends it; the token file is read on every stream."""
    if bootstrap.token_file is None:
        return None
    token = _read(bootstrap.token_file, "server.token_file").decode("utf-8", "replace").strip()
    if not token:
        raise CredentialsError(f"server.token_file {bootstrap.token_file}: empty")
    if any(c in token for c in "\r\n\0"):
        raise CredentialsError(f"server.token_file {bootstrap.token_file}: not a single-line token")
    return (("authorization", f"Bearer {token}"),)


def make_channel(bootstrap: Bootstrap) -> grpc.aio.Channel:
    options = [*CHANNEL_OPTIONS, ("grpc.max_receive_message_length", bootstrap.max_receive_bytes)]
    if bootstrap.tls is None:
        return grpc.aio.insecure_channel(bootstrap.server, options=options)
    tls = bootstrap.tls
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca, "server.tls.ca"),
        private_key=_read(tls.key, "server.tls.key") if tls.key else None,
        certificate_chain=_read(tls.cert, "server.tls.cert") if tls.cert else None,
    )
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(bootstrap.server, creds, options=options)


_EOF = object()


async def _requests(outbox: asyncio.Queue[Any]) -> Any:
    """The stream's requests. gRPC writes them itself: a write racing the server's end of the call (a
    refused token) must not replace the server's status (UNAUTHENTICATED) by a local INTERNAL error."""
    while (req := await outbox.get()) is not None:
        yield req


def _tls_failure(details: str | None) -> bool:
    text = (details or "").lower()
    return any(word in text for word in ("ssl", "handshake", "certificate", "tls"))


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
        self.warming: tuple[str, ...] = ()  # listeners waiting for their route configuration
        self.listener_scope: Callable[[Listener], Listener] | None = None  # per_resource.translate_update's scope

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
            "warming_listeners": list(self.warming),
            "ignored_responses": self.state.ignored_responses,
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
                self.last_error = self._explain(exc)
            except CredentialsError as exc:
                self.last_error = str(exc)
            self.state.stream_reset(self._clock())
            await self._wait(self.backoff.next_delay())

    def _explain(self, exc: grpc.aio.AioRpcError) -> str:
        """The server's error, with the bootstrap setting that most likely explains it."""
        code = exc.code()
        text = f"{code.name}: {exc.details()}"
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            text += f" (responses are limited to server.max_receive_bytes = {self.bootstrap.max_receive_bytes})"
        elif code is grpc.StatusCode.UNAUTHENTICATED:
            text += (
                " (the server refused the token of server.token_file)"
                if self.bootstrap.token_file
                else (" (the server wants a token: set server.token_file)")
            )
        elif code is grpc.StatusCode.UNAVAILABLE and self.bootstrap.tls is not None and _tls_failure(exc.details()):
            text += " (TLS: does server.tls.ca sign the server's certificate for server.tls.server_name?)"
        return text

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
        metadata = call_metadata(self.bootstrap)
        async with make_channel(self.bootstrap) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            outbox: asyncio.Queue[Any] = asyncio.Queue()
            if self.bootstrap.mode is Mode.DELTA:
                call = stub.DeltaAggregatedResources(_requests(outbox), metadata=metadata)
            else:
                call = stub.StreamAggregatedResources(_requests(outbox), metadata=metadata)
            queue: asyncio.Queue[Any] = asyncio.Queue()
            reader = asyncio.create_task(self._read(call, queue))
            self.streams += 1
            try:
                await self._execute(outbox, self.state.stream_started(self._clock()))
                while True:
                    deadline = self.state.next_deadline()
                    timeout = None if deadline is None else max(0.0, deadline - self._clock())
                    try:
                        item = await asyncio.wait_for(queue.get(), timeout)
                    except TimeoutError:
                        await self._execute(outbox, self.state.timer_fired(self._clock()))
                        continue
                    if item is _EOF:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    self.backoff.reset()  # the server answered: next outage starts from the base delay
                    await self._execute(outbox, self.state.response_received(item, self._clock()))
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

    async def _execute(self, outbox: asyncio.Queue[Any] | None, actions: list[Action]) -> None:
        work = list(actions)
        while work:
            action = work.pop(0)
            if isinstance(action, SendRequest):
                if outbox is not None:  # None: no stream (timers during the backoff)
                    outbox.put_nowait(action.request)
            elif isinstance(action, ApplyConfig):
                error, rejected = await self._apply_resources(action)
                work += self.state.apply_result(action.token, error, self._clock(), rejected)

    async def _apply_resources(self, action: ApplyConfig) -> tuple[ConfigError | None, Rejected]:
        """Apply every valid resource; (None, the rejected ones) or (the error refusing everything, {})."""
        try:
            result = translate_update(
                action.resources, self.bootstrap.planes, self.translation_cache, action.accepted, self.listener_scope
            )
            await self._apply(result.snapshot)
        except ConfigError as exc:
            self.last_error = str(exc)
            return exc, {}
        self.snapshot = result.snapshot
        self.warming = result.warming
        self.last_error = None
        self.applied.set()
        return None, {t: dict(r) for t, r in result.rejected.items()}
