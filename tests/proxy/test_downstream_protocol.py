"""use_downstream_protocol_config (istiod's clusters for ports of unknown protocol): a gRPC (HTTP/2) client
reaches a grpcio server through the proxy over h2c, while an HTTP/1.1 client of the same cluster stays on
HTTP/1.1 upstream. Real sockets on loopback, real grpcio server and client."""

from __future__ import annotations

import grpc

from planemesh.model.config import Cluster, ClusterKind, Endpoint
from tests.proxy.proxy_harness import ProxyThread
from tests.proxy.test_h2_grpc import _ident, grpc_backend  # noqa: F401 - the module fixture
from tests.proxy.test_traffic_resilience import VersionServer, get


def _auto(port: int) -> dict[str, Cluster]:
    endpoint = Endpoint(address="127.0.0.1", port=port)
    return {"backend": Cluster("backend", ClusterKind.STATIC, (endpoint,), downstream_protocol=True)}


def test_grpc_client_gets_h2c_upstream(grpc_backend: int) -> None:  # noqa: F811
    with (
        ProxyThread([("127.0.0.1", grpc_backend)], clusters=_auto(grpc_backend)) as proxy,
        grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as ch,
    ):
        reply, call = ch.unary_unary("/t.Svc/Unary", *_ident).with_call(b"auto", timeout=5)
        assert reply == b"echo:auto" and ("x-trailer", "t1") in call.trailing_metadata()


def test_http1_client_stays_on_http1_upstream() -> None:
    with VersionServer("v1") as v1, ProxyThread([("127.0.0.1", v1.port)], clusters=_auto(v1.port)) as proxy:
        assert get(proxy.port, "/h1")[0] == 200  # VersionServer speaks HTTP/1.1 only
        assert [seen[1] for seen in v1.seen] == ["/h1"]
