"""HBONE with certificates by istio's CreateCertificate (agent/hbone/csr_certs.py) over real gRPC on loopback:
`ManagementServer` with a `CsrSigner` plays istiod's CA, node A's pool presents the source workload's
certificate it got by CSR, node B (built-in CA under the same root) authorizes that identity; a renewed
certificate takes new tunnels to a new connection while the open one continues; an identity the node never
asked for has no certificate."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path

import pytest
import uvloop

from planemesh.agent.hbone.csr_certs import CsrCertSource, NoCertificate
from planemesh.agent.identity.ca import new_root, utcnow
from planemesh.agent.identity.ca_service import CsrSigner
from planemesh.agent.identity.cert_client import CaSettings
from planemesh.xds.server import ManagementServer
from tests.proxy.hbone_harness import ID_A, ID_B, NODE_A, TD, hbone_pair, recv_all


def test_tunnels_with_certificates_from_create_certificate_and_their_renewal(tmp_path: Path) -> None:
    root = new_root(TD, now=utcnow() - dt.timedelta(minutes=5))
    (tmp_path / "token").write_text("node-a-token\n")

    async def scenario() -> tuple[int, dict]:
        signer = CsrSigner(root, {"node-a-token": None}, ttl_s=3600)  # node-trusted: any identity of the domain
        server = ManagementServer(None, csr_signer=signer)
        address = await server.start("127.0.0.1:0")
        certs = CsrCertSource(CaSettings(address, token_file=str(tmp_path / "token"), ttl_s=3600), NODE_A, [ID_A])
        try:
            await certs.start(timeout_s=20)
            await asyncio.wait_for(certs.clients[ID_A].ready.wait(), 20)
            with pytest.raises(NoCertificate):
                certs.client_context(ID_B)  # never asked for
            first_ctx = certs.client_context(ID_A)
            async with hbone_pair(
                root.intermediate("node-a", now=utcnow()), root.intermediate("node-b", now=utcnow()), certs_a=certs
            ) as pair:
                first = await pair.open()
                loop = asyncio.get_running_loop()
                await loop.sock_sendall(first, b"one")
                assert await recv_all(first, 3) == b"one"
                certs.clients[ID_A].renew_now()  # as at half-life
                async with asyncio.timeout(20):
                    while certs.client_context(ID_A) is first_ctx:
                        await asyncio.sleep(0.05)
                second = await pair.open()
                payload = os.urandom(100_000)
                await loop.sock_sendall(second, payload)
                await loop.sock_sendall(first, b"still")  # the old connection's tunnel continues
                assert await recv_all(first, 5) == b"still"
                assert await recv_all(second, len(payload)) == payload
                first.close()
                second.close()
                return pair.stats_a.connections_out, {"in": pair.stats_b.tunnels_in, "signed": signer.signed}
        finally:
            await certs.close()
            await server.stop(0)

    connections, seen = uvloop.run(asyncio.wait_for(scenario(), 60))
    assert connections == 2  # the renewed certificate opened a new pooled connection
    assert seen == {"in": 2, "signed": 3}  # node A's, amf's, amf's renewal


def test_an_identity_learned_later_gets_its_certificate(tmp_path: Path) -> None:
    """A local workload that WDS reports after the start (`want`): its own CertificateClient, a certificate."""
    root = new_root(TD, now=utcnow() - dt.timedelta(minutes=5))
    (tmp_path / "token").write_text("node-a-token\n")

    async def scenario() -> int:
        signer = CsrSigner(root, {"node-a-token": None}, ttl_s=3600)
        server = ManagementServer(None, csr_signer=signer)
        address = await server.start("127.0.0.1:0")
        certs = CsrCertSource(CaSettings(address, token_file=str(tmp_path / "token"), ttl_s=3600), NODE_A, [])
        try:
            await certs.start(timeout_s=20)
            with pytest.raises(NoCertificate):
                certs.client_context(ID_B)
            certs.want([ID_B, NODE_A])
            await asyncio.wait_for(certs.clients[ID_B].ready.wait(), 20)
            assert certs.client_context(ID_B) is not None
            return signer.signed
        finally:
            await certs.close()
            await server.stop(0)

    assert uvloop.run(asyncio.wait_for(scenario(), 60)) == 2  # the node's, then the learned workload's
