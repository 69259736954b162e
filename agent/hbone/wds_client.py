"""The HBONE node's own ADS stream for istio's WDS types (as ztunnel holds its own xDS stream to istiod),
driving the sans-IO WdsState (agent/hbone/wds.py): subscribe, ACK or NACK each response, hand every changed
table to `on_table`, reconnect with backoff. Losing the server changes nothing: the last table stays."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from envoy.service.discovery.v3 import discovery_pb2

from planemesh.agent.hbone.settings import Wds
from planemesh.agent.hbone.stats import HboneStats
from planemesh.agent.hbone.wds import Table, WdsState
from planemesh.xds.grpc_wire import RpcError
from planemesh.xds.server_channel import CredentialsError, bearer_metadata, open_channel
from planemesh.xds.transport import ADS_SERVICE, Backoff

log = logging.getLogger("planemesh.hbone.wds")


async def _requests(outbox: asyncio.Queue) -> object:
    while (req := await outbox.get()) is not None:
        yield req


class WdsClient:
    def __init__(
        self, wds: Wds, state: WdsState, on_table: Callable[[Table], None], stats: HboneStats | None = None
    ) -> None:
        self.wds = wds
        self.address = wds.address
        self.state = state
        self.on_table = on_table
        self.stats = stats
        self.connected = asyncio.Event()
        self.received = asyncio.Event()  # a first response of each type arrived (the table is complete)

    async def run(self) -> None:
        """Forever (cancel to stop)."""
        backoff = Backoff(0.5, 10.0)
        while True:
            try:
                await self._stream(backoff)
            except RpcError as exc:
                log.warning("WDS stream to %s ended: %s %s", self.address, exc.code().name, exc.details())
            except CredentialsError as exc:  # a CA or token file not there (yet): retried
                log.warning("WDS stream to %s: %s", self.address, exc)
            self.connected.clear()
            await asyncio.sleep(backoff.next_delay())

    async def _stream(self, backoff: Backoff) -> None:
        outbox: asyncio.Queue = asyncio.Queue()
        for req in self.state.initial_requests():
            outbox.put_nowait(req)
        seen: set[str] = set()
        metadata = bearer_metadata(self.wds.token_file, "wds.token_file")
        async with open_channel(self.address, self.wds.tls, "wds.tls") as channel:
            call = channel.stream(ADS_SERVICE + "StreamAggregatedResources", _requests(outbox),
                                  discovery_pb2.DiscoveryResponse.FromString, metadata or ())  # fmt: skip
            try:
                async for resp in call:
                    self.connected.set()
                    backoff.reset()
                    reply, changed = self.state.on_response(resp)
                    if self.stats is not None:
                        self.stats.wds_acks, self.stats.wds_nacks = self.state.acks, self.state.nacks
                    if changed:
                        self.on_table(self.state.table)
                    if reply.HasField("error_detail"):
                        log.error("WDS NACK %s: %s", resp.type_url.rsplit(".", 1)[-1], reply.error_detail.message)
                    outbox.put_nowait(reply)
                    seen.add(resp.type_url)
                    if len(seen) == 2:
                        self.received.set()
            finally:
                outbox.put_nowait(None)
