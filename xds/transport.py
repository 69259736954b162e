"""The ADS stream over gRPC (xds/grpc_channel.py: never grpcio), driving the sans-IO AdsClientState; the
integrator's XdsClient.

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
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from planemesh.agent.identity.cert_client import CertificateClient
from planemesh.model.config import ConfigError, Listener, Snapshot
from planemesh.model.tls_config import plane_secret_names
from planemesh.xds.bootstrap import Bootstrap
from planemesh.xds.client_state import Action, AdsClientState, ApplyConfig, Mode, SendRequest, XdsResources
from planemesh.xds.grpc_channel import Channel
from planemesh.xds.grpc_wire import EOF, RpcError, StatusCode
from planemesh.xds.per_resource import Rejected, translate_update
from planemesh.xds.sds_secrets import ROOT_SECRET, WORKLOAD_SECRET, root_secret, tls_certificate_secret
from planemesh.xds.server_channel import CredentialsError, bearer_metadata, open_channel
from planemesh.xds.translate import TranslationCache

if TYPE_CHECKING:
    from planemesh.agent.identity.csr import WorkloadCert

log = logging.getLogger("planemesh.xds.transport")
USER_AGENT = "planemesh"
ADS_SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"


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


def call_metadata(bootstrap: Bootstrap) -> tuple[tuple[str, str], ...] | None:
    return bearer_metadata(bootstrap.token_file, "server.token_file")


def make_channel(bootstrap: Bootstrap) -> Channel:
    return open_channel(bootstrap.server, bootstrap.tls, "server.tls", bootstrap.max_receive_bytes)


_EOF = object()
_RECONFIGURED = object()


class AdsCall(Protocol):
    """One ADS stream as the client sees it (xds/grpc_channel.py's StreamCall is one; so is tests/support/ads.py's
    in-memory FakeAdsServer): the server's messages, then grpc_wire.EOF; RpcError when the server fails it."""

    async def read(self) -> Any: ...

    def cancel(self) -> bool: ...


# (bootstrap, the client's requests) -> a context manager holding the open stream for its lifetime.
OpenStream = Callable[[Bootstrap, AsyncIterator[Any]], contextlib.AbstractAsyncContextManager[AdsCall]]


@contextlib.asynccontextmanager
async def grpc_stream(bootstrap: Bootstrap, requests: AsyncIterator[Any]) -> AsyncIterator[AdsCall]:
    """The ADS stream over gRPC to the bootstrap's server (SotW or delta as it says)."""
    metadata = call_metadata(bootstrap) or ()
    async with make_channel(bootstrap) as channel:
        if bootstrap.mode is Mode.DELTA:
            yield channel.stream(ADS_SERVICE + "DeltaAggregatedResources", requests,
                                 discovery_pb2.DeltaDiscoveryResponse.FromString, metadata)  # fmt: skip
        else:
            yield channel.stream(ADS_SERVICE + "StreamAggregatedResources", requests,
                                 discovery_pb2.DiscoveryResponse.FromString, metadata)  # fmt: skip


async def _requests(outbox: asyncio.Queue[Any]) -> Any:
    """The stream's requests. The call writes them itself: a write racing the server's end of the call (a
    refused token) must not replace the server's status (UNAUTHENTICATED) by a local INTERNAL error."""
    while (req := await outbox.get()) is not None:
        yield req


def _tls_failure(details: str | None) -> bool:
    text = (details or "").lower()
    return any(word in text for word in ("ssl", "handshake", "certificate", "tls"))


def ads_state(bootstrap: Bootstrap) -> AdsClientState:
    """The ADS state machine for `bootstrap`, subscribed to the Secrets its planes' mTLS needs (the CSR flow's
    `default`/`ROOTCA` are local, not the server's)."""
    local = {WORKLOAD_SECRET, ROOT_SECRET} if bootstrap.ca is not None and bootstrap.identity is not None else set()
    pinned = frozenset(plane_secret_names(bootstrap.planes)) - local
    return AdsClientState(node_identity(bootstrap), bootstrap.mode,
                          initial_fetch_timeout_s=bootstrap.initial_fetch_timeout_s, pinned_secrets=pinned)  # fmt: skip


class XdsClient:
    def __init__(
        self,
        bootstrap: Bootstrap,
        apply: Callable[[Snapshot], Awaitable[None]],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        open_stream: OpenStream = grpc_stream,
    ) -> None:
        self.bootstrap = bootstrap
        self._apply = apply
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._open_stream = open_stream
        self._queue: asyncio.Queue[Any] | None = None  # the live stream's inbox
        self._reconfigured = asyncio.Event()
        self._pending: Bootstrap | None = None  # reconfigure()'s bootstrap, not adopted yet
        self.state = ads_state(bootstrap)
        self.backoff = Backoff(bootstrap.backoff_base_s, bootstrap.backoff_max_s, rng)
        self.snapshot: Snapshot | None = None
        self.streams = 0
        self.last_error: str | None = None
        self.applied = asyncio.Event()  # set after every applied snapshot (tests and readiness)
        self.translation_cache = TranslationCache()  # unchanged resources are not translated again
        self.warming: tuple[str, ...] = ()  # listeners waiting for their route configuration
        # Bootstrap `ca:`: `default`/`ROOTCA` come from istio's CSR flow here, as istio-agent's SDS serves them
        # to Envoy; they take precedence over Secrets of those names from the server.
        self.certificates = (
            CertificateClient(bootstrap.ca, bootstrap.identity, self._certificate_changed)
            if bootstrap.ca is not None and bootstrap.identity is not None
            else None
        )
        self._local_secrets: dict[str, Any] = {}
        self._last_update: ApplyConfig | None = None  # re-translated when the certificate rotates
        self._apply_lock = asyncio.Lock()
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
            "certificate": self.certificates.status() if self.certificates is not None else None,
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
        """The admin/metrics provider (agent/stats_report.py's StatsReport as a dict): per type URL."""
        rows = [
            {"type_url": t.type_url, "version": t.version, "acks": t.acks, "nacks": t.nacks, "resources": t.resources}
            for t in self.state.status()
        ]
        report: dict[str, Any] = {"xds": rows, "xds_connected": self.state.connected}
        if self.certificates is not None:  # istio's CSR flow (agent/identity/cert_metrics.py)
            report["certificates"] = [self.certificates.stats_row()]
        return report

    def reconfigure(self, bootstrap: Bootstrap) -> bool:
        """A new bootstrap (SIGHUP with --bootstrap): when it differs, the stream ends at once and a new one starts
        with it, as at start-up (subscriptions, versions and translations are the new server's business; the
        applied snapshot keeps serving until the new stream's first update is applied). False: unchanged."""
        if bootstrap == (self._pending or self.bootstrap):
            return False
        self._pending = bootstrap  # adopted by run() once the stream (or the backoff wait) has ended
        self._reconfigured.set()
        if self._queue is not None:
            self._queue.put_nowait(_RECONFIGURED)
        return True

    def _adopt(self, bootstrap: Bootstrap) -> None:
        self.bootstrap = bootstrap
        self.state = ads_state(bootstrap)
        self.backoff = Backoff(bootstrap.backoff_base_s, bootstrap.backoff_max_s, self._rng)
        self.translation_cache = TranslationCache()  # the planes may have changed: translation depends on them
        self.last_error = None

    # ---- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever. Exceptions other than the server's (a consumer bug) propagate to the caller."""
        if self.certificates is None:
            await self._run_streams()
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(self.certificates.run())
            group.create_task(self._run_streams())

    async def _run_streams(self) -> None:
        while True:
            try:
                await self._one_stream()
                self.last_error = "server closed the stream"
            except RpcError as exc:
                self.last_error = self._explain(exc)
            except CredentialsError as exc:
                self.last_error = str(exc)
            if self._pending is None:
                self.state.stream_reset(self._clock())
                await self._wait(self.backoff.next_delay())
            if self._pending is not None:  # a new bootstrap: connect with it now, no backoff
                self._adopt(self._pending)
                self._pending = None
                self._reconfigured.clear()

    def _explain(self, exc: RpcError) -> str:
        """The server's error, with the bootstrap setting that most likely explains it."""
        code = exc.code()
        text = f"{code.name}: {exc.details()}"
        if code is StatusCode.RESOURCE_EXHAUSTED:
            text += f" (responses are limited to server.max_receive_bytes = {self.bootstrap.max_receive_bytes})"
        elif code is StatusCode.UNAUTHENTICATED:
            text += (
                " (the server refused the token of server.token_file)"
                if self.bootstrap.token_file
                else (" (the server wants a token: set server.token_file)")
            )
        elif code is StatusCode.UNAVAILABLE and self.bootstrap.tls is not None and _tls_failure(exc.details()):
            text += " (TLS: does server.tls.ca sign the server's certificate for server.tls.server_name?)"
        return text

    async def _wait(self, delay: float) -> None:
        """Sleep through the backoff, still firing timers (TTL expiry needs no server)."""
        end = self._clock() + delay
        while (now := self._clock()) < end and not self._reconfigured.is_set():
            deadline = self.state.next_deadline()
            if deadline is not None and deadline <= now:
                await self._execute(None, self.state.timer_fired(now))
                continue
            await self._sleep_unless_reconfigured(min(end, deadline or end) - now)

    async def _sleep_unless_reconfigured(self, seconds: float) -> None:
        sleep = asyncio.ensure_future(self._sleep(seconds))
        woken = asyncio.ensure_future(self._reconfigured.wait())
        try:
            await asyncio.wait({sleep, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleep, woken):
                task.cancel()
            await asyncio.gather(sleep, woken, return_exceptions=True)

    async def _one_stream(self) -> None:
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        async with self._open_stream(self.bootstrap, _requests(outbox)) as call:
            if self._pending is not None:
                return  # reconfigured while connecting
            self._queue = queue = asyncio.Queue()
            reader = asyncio.create_task(self._read(call, queue))
            self.streams += 1
            try:
                await self._execute(outbox, self.state.stream_started(self._clock()))
                while True:
                    deadline = self.state.next_deadline()
                    timeout = None if deadline is None else max(0.0, deadline - self._clock())
                    try:
                        async with asyncio.timeout(timeout):
                            item = await queue.get()
                    except TimeoutError:
                        await self._execute(outbox, self.state.timer_fired(self._clock()))
                        continue
                    if item is _EOF or item is _RECONFIGURED:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    self.backoff.reset()  # the server answered: next outage starts from the base delay
                    await self._execute(outbox, self.state.response_received(item, self._clock()))
            finally:
                self._queue = None
                reader.cancel()
                call.cancel()
                await asyncio.wait({reader})  # the reader's end, never a cancellation of this task swallowed
                if not reader.cancelled() and (exc := reader.exception()) is not None:
                    raise exc

    @staticmethod
    async def _read(call: Any, queue: asyncio.Queue[Any]) -> None:
        try:
            while True:
                msg = await call.read()
                if msg is EOF:
                    await queue.put(_EOF)
                    return
                await queue.put(msg)
        except RpcError as exc:
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
        certs = self.certificates
        if certs is not None and not certs.ready.is_set():  # SDS warming: the first certificate, bounded
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.bootstrap.initial_fetch_timeout_s):
                    await certs.ready.wait()
        async with self._apply_lock:
            self._last_update = action
            return await self._translate_and_apply(action)

    async def _translate_and_apply(self, action: ApplyConfig) -> tuple[ConfigError | None, Rejected]:
        local = self._with_local_secrets
        try:
            result = translate_update(
                local(action.resources), self.bootstrap.planes, self.translation_cache, local(action.accepted),
                self.listener_scope,
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

    def _with_local_secrets(self, resources: XdsResources | None) -> XdsResources | None:
        if resources is None or not self._local_secrets:
            return resources
        return dataclasses.replace(resources, secrets=MappingProxyType({**resources.secrets, **self._local_secrets}))

    async def _certificate_changed(self, cert: WorkloadCert) -> None:
        """A new workload certificate: new handshakes use it once the last update is translated again
        (open connections keep theirs, as with a rotated SDS Secret)."""
        self._local_secrets = {
            WORKLOAD_SECRET: tls_certificate_secret(cert),
            ROOT_SECRET: root_secret(cert.roots_pem()),
        }
        async with self._apply_lock:
            if self._last_update is None:
                return
            error, _ = await self._translate_and_apply(self._last_update)
            if error is not None:
                log.error("the new workload certificate is not applied: %s", error)
