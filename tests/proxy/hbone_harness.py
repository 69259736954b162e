"""Two HBONE nodes in one event loop on loopback: node A's pool and outbound, node B's inbound, an echo pod.

The captured socket is one end of a socketpair handed to `Outbound.tunnel` with the source and destination the
capture listener would read from getsockname()/getpeername() (the netns lab covers the capture itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from planemesh.agent.hbone.certs import CaCertSource
from planemesh.agent.hbone.conn import TcpSide
from planemesh.agent.hbone.inbound import Inbound
from planemesh.agent.hbone.outbound import Outbound, Pool
from planemesh.agent.hbone.routes import Peer, Routes
from planemesh.agent.hbone.stats import HboneStats
from planemesh.agent.identity.ca import CertificateAuthority, new_root, utcnow
from planemesh.agent.rbac import RbacFilter

TD = "cluster.local"
POD_A, POD_B = "127.0.0.10", "127.0.0.20"
ID_A = f"spiffe://{TD}/ns/ran/sa/amf"
ID_B = f"spiffe://{TD}/ns/ran/sa/smf"
NODE_A = f"spiffe://{TD}/ns/planemesh/sa/node-a"
NODE_B = f"spiffe://{TD}/ns/planemesh/sa/node-b"


def node_cas(root: CertificateAuthority | None = None) -> tuple[CertificateAuthority, CertificateAuthority]:
    root = root or new_root(TD, now=utcnow())
    return root.intermediate("node-a", now=utcnow()), root.intermediate("node-b", now=utcnow())


async def echo_server(host: str) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, host, 0)


@dataclass
class Pair:
    outbound: Outbound
    inbound: Inbound
    stats_a: HboneStats
    stats_b: HboneStats
    echo_port: int

    async def open(self, src: str = POD_A, dst: str = POD_B, port: int | None = None) -> socket.socket:
        return await open_tunnel(self.outbound, src, dst, port or self.echo_port)


async def open_tunnel(outbound: Outbound, src: str, dst: str, port: int) -> socket.socket:
    """A client socket whose other end `outbound` tunnels as if captured (returns once the tunnel decided)."""
    client, captured = socket.socketpair()
    side = TcpSide()
    await asyncio.get_running_loop().connect_accepted_socket(lambda: side, captured)
    assert side.transport is not None
    side.transport.pause_reading()
    await outbound.tunnel(side, src, dst, port)
    client.setblocking(False)
    return client


@contextlib.asynccontextmanager
async def hbone_pair(
    ca_a: CertificateAuthority, ca_b: CertificateAuthority, rbacs: tuple[RbacFilter, ...] = (),
    peer_identity: str | None = NODE_B, certs_a: CaCertSource | None = None, server: Any = None,
    certs_b: Any = None,
) -> AsyncIterator[Pair]:  # fmt: skip
    """`server`: an async factory of the pod's server (default: echo) taking the address to listen on; `certs_b`:
    node B's CertSource (default: its CA's)."""
    echo = await (server or echo_server)(POD_B)
    echo_port = echo.sockets[0].getsockname()[1]
    stats_a, stats_b = HboneStats(), HboneStats()
    routes_b = Routes({POD_B: ID_B})
    inbound = Inbound(lambda: routes_b, lambda: rbacs, certs_b or CaCertSource(ca_b, NODE_B), stats_b)
    server = await inbound.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    peer = Peer("node-b", ("127.0.0.1", port), (ipaddress.ip_network(f"{POD_B}/32"),), peer_identity)
    routes_a = Routes({POD_A: ID_A}, (peer,))
    outbound = Outbound(routes_a, Pool(certs_a or CaCertSource(ca_a, NODE_A), stats_a), stats_a)
    try:
        yield Pair(outbound, inbound, stats_a, stats_b, echo_port)
    finally:
        await outbound.close()
        await inbound.close()
        echo.close()


async def recv_all(sock: socket.socket, n: int | None = None, timeout: float = 10.0) -> bytes:
    """Read until EOF (or n bytes); b'' plus whatever came when the peer resets."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    async with asyncio.timeout(timeout):
        while n is None or len(got) < n:
            try:
                data = await loop.sock_recv(sock, 1 << 16)
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
    return bytes(got)
