"""HBONE interop with the real Envoy 1.40 on loopback, certificates from planemesh's built-in CA (one root, a
node intermediate each side):

- Envoy as the HBONE terminator (mTLS + h2 `allow_connect`, CONNECT routed to an ORIGINAL_DST cluster that takes
  the destination from `:authority`, Envoy's RBAC allowing only the source workload's SPIFFE ID): planemesh's
  outbound tunnels a pod's bytes through it, and a source with another identity gets Envoy's 403.
- Envoy as the HBONE originator (`tcp_proxy` with `tunneling_config` over an h2 mTLS cluster): planemesh's
  inbound authorizes Envoy's SPIFFE ID and delivers the bytes in plaintext to the pod.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from pathlib import Path

import uvloop

from planemesh.agent.hbone.certs import CaCertSource
from planemesh.agent.hbone.inbound import Inbound
from planemesh.agent.hbone.outbound import Outbound, Pool
from planemesh.agent.hbone.routes import Peer, Routes
from planemesh.agent.hbone.settings import parse_rbac
from planemesh.agent.hbone.stats import HboneStats
from planemesh.agent.identity.ca import CertificateAuthority, key_pem, new_root, utcnow
from planemesh.agent.identity.spiffe import parse_spiffe_id
from tests.proxy.hbone_harness import ID_A, ID_B, NODE_A, NODE_B, POD_A, POD_B, echo_server, open_tunnel, recv_all
from tests.proxy.proxy_harness import free_port
from tests.proxy.test_tls_envoy_interop import EnvoyProc, _b64

T = "type.googleapis.com/"
ENVOY_ID = "spiffe://cluster.local/ns/ran/sa/envoy"


def _tls(ca: CertificateAuthority, identity: str, root: CertificateAuthority) -> dict:
    issued = ca.issue(parse_spiffe_id(identity), now=utcnow())
    return {
        "tls_certificates": [{"certificate_chain": {"inline_bytes": _b64(issued.cert_chain_pem())},
                              "private_key": {"inline_bytes": _b64(key_pem(issued.key))}}],
        "validation_context": {"trusted_ca": {"inline_bytes": _b64(root.root_pem())}},
        "alpn_protocols": ["h2"],
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
    }  # fmt: skip


def terminator(
    port: int, ca: CertificateAuthority, root: CertificateAuthority, address: str = "127.0.0.1"
) -> tuple[list, list]:
    allow_a = {"rules": {"action": "ALLOW", "policies": {"amf-only": {
        "permissions": [{"any": True}],
        "principals": [{"authenticated": {"principal_name": {"exact": ID_A}}}]}}}}  # fmt: skip
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hbone", "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
            "match": {"connect_matcher": {}},
            "route": {"cluster": "pods", "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}}]}]},
        "http_filters": [
            {"name": "envoy.filters.http.rbac", "typed_config": {
                "@type": T + "envoy.extensions.filters.http.rbac.v3.RBAC", **allow_a}},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}],
    }  # fmt: skip
    listener = {
        "name": "hbone", "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [{
            "transport_socket": {"name": "tls", "typed_config": {
                "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": True, "common_tls_context": _tls(ca, NODE_B, root)}},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }  # fmt: skip
    cluster = {
        "name": "pods", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s",
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": ":authority"},
    }  # fmt: skip
    return [listener], [cluster]


def originator(
    port: int, target: str, inbound: int, ca: CertificateAuthority, root: CertificateAuthority,
    inbound_host: str = "127.0.0.1", identity: str = ENVOY_ID, transparent: bool = False,
) -> tuple:  # fmt: skip
    """`target`: the CONNECT authority (`%DOWNSTREAM_LOCAL_ADDRESS%` with `transparent`: the original destination)."""
    listener = {
        "name": "plain", "address": {"socket_address": {"address": "0.0.0.0" if transparent else "127.0.0.1",
                                                        "port_value": port}},
        **({"transparent": True, "listener_filters": [{"name": "envoy.filters.listener.original_dst",
            "typed_config": {"@type": T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}]}
           if transparent else {}),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
            "@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "out", "cluster": "hbone", "tunneling_config": {"hostname": target}}}]}],
    }  # fmt: skip
    tls = _tls(ca, identity, root)
    tls["validation_context"]["match_typed_subject_alt_names"] = [{"san_type": "URI", "matcher": {"exact": NODE_B}}]
    cluster = {
        "name": "hbone", "type": "STATIC", "connect_timeout": "2s",
        "load_assignment": {"cluster_name": "hbone", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": inbound_host, "port_value": inbound}}}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "transport_socket": {"name": "tls", "typed_config": {
            "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": tls}},
    }  # fmt: skip
    return [listener], [cluster]


async def _roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, payload)
    sock.shutdown(socket.SHUT_WR)
    return await recv_all(sock)


def test_envoy_terminates_planemesh_hbone_and_authorizes_the_source_workload(tmp_path: Path) -> None:
    root = new_root("cluster.local", now=utcnow())
    ca_a, ca_b = root.intermediate("node-a", now=utcnow()), root.intermediate("node-b", now=utcnow())
    port = free_port()
    envoy = EnvoyProc(tmp_path, *terminator(port, ca_b, root))

    async def scenario() -> None:
        echo = await echo_server(POD_B)
        echo_port = echo.sockets[0].getsockname()[1]
        stats = HboneStats()
        peer = Peer("envoy", ("127.0.0.1", port), (ipaddress.ip_network(f"{POD_B}/32"),), NODE_B)
        routes = Routes({POD_A: ID_A, "127.0.0.11": ID_B}, (peer,))
        outbound = Outbound(routes, Pool(CaCertSource(ca_a, NODE_A), stats), stats)

        async def open_from(src: str) -> socket.socket:
            return await open_tunnel(outbound, src, POD_B, echo_port)

        try:
            payloads = [os.urandom(200_000) for _ in range(4)]
            socks = [await open_from(POD_A) for _ in payloads]
            got = await asyncio.gather(*(_roundtrip(s, p) for s, p in zip(socks, payloads, strict=True)))
            assert got == payloads
            assert stats.connections_out == 1 and stats.tunnels_out == 4  # four CONNECT streams, one connection
            other = await open_from("127.0.0.11")  # ID_B: Envoy's RBAC allows only ID_A
            assert await recv_all(other) == b""
            assert stats.refused_out == {"status_403": 1}
            for s in [*socks, other]:
                s.close()
        finally:
            await outbound.close()
            echo.close()

    try:
        uvloop.run(asyncio.wait_for(scenario(), 60))
        counters = envoy.stats("http.hbone.rbac")
        assert counters.get("http.hbone.rbac.allowed") == 4 and counters.get("http.hbone.rbac.denied") == 1
    finally:
        envoy.stop()


def test_envoy_originates_hbone_to_planemesh_which_authorizes_envoys_identity(tmp_path: Path) -> None:
    root = new_root("cluster.local", now=utcnow())
    ca_envoy, ca_b = root.intermediate("node-a", now=utcnow()), root.intermediate("node-b", now=utcnow())
    allow_envoy = {"rules": {"action": "ALLOW", "policies": {"envoy-only": {
        "permissions": [{"destination_port": 0}], "principals": [
            {"authenticated": {"principal_name": {"exact": ENVOY_ID}}}]}}}}  # fmt: skip

    async def scenario() -> None:
        echo = await echo_server(POD_B)
        echo_port = echo.sockets[0].getsockname()[1]
        allow_envoy["rules"]["policies"]["envoy-only"]["permissions"] = [{"destination_port": echo_port}]
        stats = HboneStats()
        routes = Routes({POD_B: ID_B})
        inbound = Inbound(lambda: routes, lambda: parse_rbac([allow_envoy]), CaCertSource(ca_b, NODE_B), stats)
        server = await inbound.start("127.0.0.1", 0)
        port, plain = server.sockets[0].getsockname()[1], free_port()
        cfg = originator(plain, f"{POD_B}:{echo_port}", port, ca_envoy, root)
        envoy = await asyncio.to_thread(EnvoyProc, tmp_path, *cfg)
        try:
            for size in (1, 300_000):
                payload = os.urandom(size)
                reader, writer = await asyncio.open_connection("127.0.0.1", plain)
                writer.write(payload)
                await writer.drain()
                got = await asyncio.wait_for(reader.readexactly(size), 20)
                assert got == payload
                writer.close()
            assert stats.connections_in == 1 and stats.tunnels_in == 2  # Envoy pooled both on one connection
            assert stats.refused_in == {}
        finally:
            await asyncio.to_thread(envoy.stop)
            await inbound.close()
            echo.close()

    uvloop.run(asyncio.wait_for(scenario(), 60))


def test_envoy_originated_hbone_is_refused_when_rbac_denies_envoys_identity(tmp_path: Path) -> None:
    root = new_root("cluster.local", now=utcnow())
    ca_envoy, ca_b = root.intermediate("node-a", now=utcnow()), root.intermediate("node-b", now=utcnow())
    deny_envoy = {"rules": {"action": "DENY", "policies": {"no-envoy": {"permissions": [{"any": True}], "principals": [
        {"authenticated": {"principal_name": {"exact": ENVOY_ID}}}]}}}}  # fmt: skip

    async def scenario() -> None:
        echo = await echo_server(POD_B)
        echo_port = echo.sockets[0].getsockname()[1]
        stats = HboneStats()
        routes = Routes({POD_B: ID_B})
        inbound = Inbound(lambda: routes, lambda: parse_rbac([deny_envoy]), CaCertSource(ca_b, NODE_B), stats)
        server = await inbound.start("127.0.0.1", 0)
        port, plain = server.sockets[0].getsockname()[1], free_port()
        envoy = await asyncio.to_thread(EnvoyProc, tmp_path, *originator(plain, f"{POD_B}:{echo_port}", port,
                                                                         ca_envoy, root))  # fmt: skip
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", plain)
            writer.write(b"hello")
            await writer.drain()
            try:
                got = await asyncio.wait_for(reader.read(100), 20)
            except ConnectionResetError:  # Envoy resets its client when the tunnel is refused
                got = b""
            assert got == b""
            writer.close()
            assert stats.refused_in == {"rbac_denied": 1} and stats.tunnels_in == 0
        finally:
            await asyncio.to_thread(envoy.stop)
            await inbound.close()
            echo.close()

    uvloop.run(asyncio.wait_for(scenario(), 60))
