"""One stream per pod to istiod's TLS port (15012), each with the pod's own token, as istio-agent connects.

Our ManagementServer plays istiod: TLS with a certificate of a throwaway CA, and istiod's authorization (a token
stands for a namespace and service account; a stream whose node is another identity is refused with
PERMISSION_DENIED: xds/server_auth.py). A fake API server (tests/support/kube_api.py) lists the node's pods and
answers TokenRequests. With `workloads.istiod_tokens` every pod's stream is served with its own token; with the
node's one token (what the agent did before) istiod refuses the pods of other namespaces. Loopback only."""

from __future__ import annotations

import asyncio
import datetime
import os
import stat
from pathlib import Path

import grpc
import pytest

from planemesh.agent.workloads import tokens as tokens_module
from planemesh.agent.workloads.model import Workload
from planemesh.agent.workloads.settings import settings_from_dict
from planemesh.agent.workloads.sources import KubernetesPods
from planemesh.agent.workloads.streams import WorkloadStreams
from planemesh.agent.workloads.tokens import TokenError, parse_token_answer, token_request
from planemesh.xds.bootstrap import bootstrap_from_dict
from planemesh.xds.server import ManagementServer
from tests.support.clusters import LOOPBACK_PLANES, cluster_doc
from tests.support.kube_api import start_fake_api
from tests.support.waiting import until
from tests.xds.test_xds_transport import _pki
from tests.xds.xds_harness import write_resources

AGENT_TOKEN = "jwt-of-the-agent"  # planemesh-system/planemesh-agent
PODS = [("a", "default", "sa-a", "127.0.0.11", "uid-a"), ("b", "shop", "sa-b", "127.0.0.12", "uid-b")]


def _pod(name: str, ns: str, sa: str, ip: str, uid: str) -> dict:
    return {"metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "5"},
            "spec": {"nodeName": "n1", "serviceAccountName": sa},
            "status": {"phase": "Running", "podIP": ip}}  # fmt: skip


def _minted(ns: str, sa: str, pod: str) -> str:
    return f"jwt.{ns}.{sa}.{pod}"


def _mint(path: str, body: dict) -> tuple[int, dict]:
    """TokenRequest for /api/v1/namespaces/<ns>/serviceaccounts/<sa>/token, bound to a pod."""
    parts = path.split("/")
    ns, sa = parts[4], parts[6]
    pod = body["spec"].get("boundObjectRef", {}).get("name", "")
    return 201, {"kind": "TokenRequest", "status": {"token": _minted(ns, sa, pod),
                                                     "expirationTimestamp": "2999-01-01T00:00:00Z"}}  # fmt: skip


@pytest.fixture
def world(tmp_path: Path):
    resdir = tmp_path / "res"
    resdir.mkdir()
    write_resources(resdir, "c.yaml", [cluster_doc("secure")])
    _ca, srv_cert, srv_key = _pki(tmp_path)
    api, state = start_fake_api({"kind": "PodList", "metadata": {"resourceVersion": "5"},
                                 "items": [_pod(*p) for p in PODS]}, _mint)  # fmt: skip
    agent_token = tmp_path / "agent-token"
    agent_token.write_text(AGENT_TOKEN + "\n")
    try:
        yield {"resdir": resdir, "creds": grpc.ssl_server_credentials([(srv_key, srv_cert)]),
               "ca": str(tmp_path / "ca.pem"), "api": f"http://127.0.0.1:{api.server_port}", "state": state,
               "agent_token": str(agent_token), "tokens": tmp_path / "run" / "istiod-tokens"}  # fmt: skip
    finally:
        api.shutdown()
        api.server_close()


def _run(world, per_pod_tokens: bool, settle: float = 0.0):
    identities = {_minted(ns, sa, pod): (ns, sa) for pod, ns, sa, _ip, _uid in PODS}
    identities[AGENT_TOKEN] = ("planemesh-system", "planemesh-agent")
    raw = {"source": "kubernetes", "node_name": "n1", "poll_interval_s": 0.05,
           "kubernetes": {"api": world["api"], "token_file": world["agent_token"]}}  # fmt: skip
    if per_pod_tokens:
        raw["istiod_tokens"] = {"dir": str(world["tokens"]), "expiration_s": 3600}
    settings = settings_from_dict(raw, {})

    async def scenario():
        server = ManagementServer(world["resdir"], token_identities=identities)
        address = await server.start("127.0.0.1:0", world["creds"])
        boot = bootstrap_from_dict({
            "node": {"id": "planemesh-node"}, "planes": LOOPBACK_PLANES,
            "server": {"address": address, "tls": {"ca": world["ca"], "server_name": "xds.test"},
                       "token_file": world["agent_token"]},
            "timing": {"backoff_base_s": 0.05, "backoff_max_s": 0.2}})  # fmt: skip
        applied = []

        async def apply(snap):
            applied.append(snap)

        streams = WorkloadStreams(boot, settings, apply)
        task = asyncio.create_task(streams.run(KubernetesPods(settings, boot.planes, timeout_s=5)))
        try:
            await until(lambda: len(streams.clients) == 2, what="a stream per pod")
            if settle:
                await asyncio.sleep(settle)
            else:
                await until(lambda: all(c.snapshot is not None for _w, c, _t in streams.clients.values()),
                            what="every pod configured")  # fmt: skip
            return server, streams, {k: c.status() for k, (_w, c, _t) in streams.clients.items()}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(0)

    return asyncio.run(scenario())


def test_each_pod_streams_to_15012_with_its_own_token(world) -> None:
    server, streams, status = _run(world, per_pod_tokens=True)
    served = {c.node_id.split("~")[2]: c.identity for c in server.clients() if c.types}
    assert served == {"a.default": ("default", "sa-a"), "b.shop": ("shop", "sa-b")}
    assert all(s["types"]["CDS"]["acks"] >= 1 for s in status.values())  # configured over 15012
    posts = world["state"]["posts"]
    assert sorted(p[0] for p in posts) == ["/api/v1/namespaces/default/serviceaccounts/sa-a/token",
                                           "/api/v1/namespaces/shop/serviceaccounts/sa-b/token"]  # fmt: skip
    for path, body, auth in posts:
        pod = "a" if "sa-a" in path else "b"
        assert auth == f"Bearer {AGENT_TOKEN}"  # the agent asks with its own token
        bound = {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": f"uid-{pod}"}
        assert body["spec"] == {"audiences": ["istio-ca"], "expirationSeconds": 3600, "boundObjectRef": bound}
    tokens = world["tokens"]
    assert stat.S_IMODE(os.stat(tokens).st_mode) == 0o700
    # the streams are closed (the task ended): their token files went with them
    assert not [p for p in tokens.iterdir() if not p.name.startswith(".")]
    assert streams.tokens is not None and streams.tokens.minted == 2
    status = streams.status()  # admin: what the agent asked the API server
    assert status["istiod_tokens"] == {"minted": 2, "failures": 0} and status["pod_requests"]["lists"] == 1


def test_a_refused_token_request_is_retried(world, monkeypatch: pytest.MonkeyPatch) -> None:
    """The API server refuses each pod's first TokenRequest: logged, retried after RETRY_S, then served."""
    monkeypatch.setattr(tokens_module, "RETRY_S", 0.2)
    calls: dict[str, int] = {}

    def flaky(path: str, body: dict) -> tuple[int, dict]:
        calls[path] = calls.get(path, 0) + 1
        return _mint(path, body) if calls[path] > 1 else (403, {"kind": "Status", "code": 403})

    world["state"]["mint"] = flaky
    server, streams, _status = _run(world, per_pod_tokens=True)
    assert sorted(calls.values()) == [2, 2] and streams.tokens is not None and streams.tokens.failures == 2
    assert {c.identity for c in server.clients() if c.types} == {("default", "sa-a"), ("shop", "sa-b")}


def test_the_node_token_alone_is_refused_for_other_identities(world) -> None:
    """What the agent did before: every stream presents the node's token; istiod authorizes by identity and
    refuses each pod's stream (PERMISSION_DENIED), none is configured."""
    _server, _streams, status = _run(world, per_pod_tokens=False, settle=1.0)
    assert all(s.get("last_error") and "PERMISSION_DENIED" in s["last_error"] for s in status.values()), status
    assert not any(s["types"].get("CDS", {}).get("acks") for s in status.values())


def test_token_request_and_answer() -> None:
    w = Workload("a", "default", ("127.0.0.11",), service_account="sa-a", uid="u1")
    raw = {"source": "kubernetes", "node_name": "n", "kubernetes": {"api": "https://k"},
           "istiod_tokens": {"audience": "aud", "expiration_s": 600}}  # fmt: skip
    settings = settings_from_dict(raw, {}).istiod_tokens
    assert settings is not None
    assert token_request(w, settings)["spec"]["boundObjectRef"]["uid"] == "u1"
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    ok = parse_token_answer(b'{"status": {"token": "t", "expirationTimestamp": "2030-01-01T00:10:00Z"}}', 600, now)
    assert (ok.token, ok.lifetime_s) == ("t", 600.0)
    bad_time = b'{"status": {"token": "t", "expirationTimestamp": "x"}}'
    for bad in (b"{}", b"<html>", b'{"status": {"token": "a b"}}', bad_time):
        with pytest.raises(TokenError):
            parse_token_answer(bad, 600, now)
