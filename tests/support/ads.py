"""An in-memory ADS server for the xDS client: the real XdsClient (state machine, translation, apply, NACKs,
reconnects) with no gRPC server, no channel and no port.

    ads = FakeAdsServer()
    client = XdsClient(boot, apply, open_stream=ads.open_stream)
    task = asyncio.create_task(client.run())
    stream = await ads.next_stream()
    first = await stream.request()                          # the client's DiscoveryRequest
    stream.respond(sotw_response(CLUSTER, "1", "n1", resources))
    ack = await stream.request()
    stream.end()   /   stream.fail(StatusCode.UNAVAILABLE)   # the client reconnects: ads.next_stream()

A stream is what planemesh.xds.transport.AdsCall asks (read/cancel, grpc_wire.EOF at the end, RpcError when
failed), so the client cannot tell it from xds/grpc_channel.py's call. What only gRPC does (message size limits, TLS,
tokens on the wire) stays in tests/xds/ with a real server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from planemesh.xds.grpc_wire import EOF, RpcError, StatusCode

DEFAULT_TIMEOUT_S = 5.0


class FakeAdsStream:
    def __init__(self, bootstrap: Any, requests: AsyncIterator[Any]) -> None:
        self.bootstrap = bootstrap  # what the client connected with
        self.cancelled = False
        self.received: list[Any] = []  # every request, in order
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._responses: asyncio.Queue[Any] = asyncio.Queue()
        self._pump = asyncio.create_task(self._pump_requests(requests))

    async def _pump_requests(self, requests: AsyncIterator[Any]) -> None:
        async for request in requests:
            self.received.append(request)
            self._requests.put_nowait(request)

    # ---- the client's side (AdsCall) -------------------------------------------------------------------
    async def read(self) -> Any:
        item = await self._responses.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        self._pump.cancel()
        self._responses.put_nowait(EOF)
        return True

    # ---- the server's side -----------------------------------------------------------------------------
    async def request(self, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        """The client's next request (DiscoveryRequest or DeltaDiscoveryRequest)."""
        return await asyncio.wait_for(self._requests.get(), timeout)

    async def request_for(self, type_url: str, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        """The client's next request of `type_url`, skipping those of other types."""
        while (request := await self.request(timeout)).type_url != type_url:
            pass
        return request

    def respond(self, *responses: Any) -> None:
        for response in responses:
            self._responses.put_nowait(response)

    def end(self) -> None:
        """The server closes the stream cleanly."""
        self._responses.put_nowait(EOF)

    def fail(self, code: StatusCode = StatusCode.UNAVAILABLE, details: str = "fake server gone") -> None:
        """The server ends the stream with an error status, as the channel reports it."""
        self._responses.put_nowait(RpcError(code, details))


class FakeAdsServer:
    """Every stream the client opens, in order. `refuse` makes the next opens fail as an unreachable server does."""

    def __init__(self) -> None:
        self.streams: list[FakeAdsStream] = []
        self.refuse: StatusCode | None = None
        self._opened: asyncio.Queue[FakeAdsStream] = asyncio.Queue()

    @contextlib.asynccontextmanager
    async def open_stream(self, bootstrap: Any, requests: AsyncIterator[Any]) -> AsyncIterator[FakeAdsStream]:
        stream = FakeAdsStream(bootstrap, requests)
        if self.refuse is not None:
            stream.fail(self.refuse, "fake server refuses")
        self.streams.append(stream)
        self._opened.put_nowait(stream)
        try:
            yield stream
        finally:
            stream.cancel()

    async def next_stream(self, timeout: float = DEFAULT_TIMEOUT_S) -> FakeAdsStream:
        return await asyncio.wait_for(self._opened.get(), timeout)


def sotw_response(type_url: str, version: str, nonce: str, resources: Iterable[Any] = ()) -> Any:
    """A state-of-the-world response; `resources` are messages (packed here) or ready Any's."""
    return discovery_pb2.DiscoveryResponse(
        type_url=type_url, version_info=version, nonce=nonce, resources=[_any(r, type_url) for r in resources]
    )


def delta_response(type_url: str, nonce: str, resources: Iterable[tuple[str, str, Any]] = (),
                   removed: Iterable[str] = ()) -> Any:  # fmt: skip
    """A delta response; `resources`: (name, version, message or Any)."""
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=type_url,
        nonce=nonce,
        system_version_info=nonce,
        resources=[discovery_pb2.Resource(name=n, version=v, resource=_any(m, type_url)) for n, v, m in resources],
        removed_resources=list(removed),
    )


def _any(message: Any, type_url: str) -> any_pb2.Any:
    if isinstance(message, any_pb2.Any):
        return message
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
