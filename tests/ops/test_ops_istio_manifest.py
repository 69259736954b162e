"""deploy/planemesh-istio.yaml, the DaemonSet a user applies next to an existing istiod: every document validates
against the Kubernetes schemas, the RBAC grants reading pods and requesting tokens (held by an admission policy to
istiod's audience and pod-bound tokens) and nothing else, the bootstrap connects to istiod's TLS port with
istiod's root certificate and per-pod tokens, the image is the one
deploy/build-image.sh builds, the arguments are flags the agent's CLI accepts, the bootstrap loads with the
agent's own parser and asks for one stream per local workload, and the env var naming the node is the one the
workloads source reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from planemesh.agent.cli import build_parser
from planemesh.agent.workloads.settings import NODE_NAME_ENV
from planemesh.xds.bootstrap import bootstrap_from_dict

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "planemesh-istio.yaml"


def _docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _one(kind: str) -> dict:
    (doc,) = [d for d in _docs() if d["kind"] == kind]
    return doc


def _container() -> dict:
    (agent,) = _one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return agent


def test_manifests_parse_and_validate() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kinds = []
    for doc in _docs():
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Namespace",
                             "ServiceAccount", "ValidatingAdmissionPolicy",
                             "ValidatingAdmissionPolicyBinding"]  # fmt: skip


def test_rbac_reads_pods_requests_tokens_and_nothing_else() -> None:
    rules = _one("ClusterRole")["rules"]
    assert rules == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                     {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}]  # fmt: skip
    # the token grant is held to istiod's audience, pod-bound tokens, the agent's own requests
    policy = _one("ValidatingAdmissionPolicy")
    account = _one("ServiceAccount")["metadata"]
    (cond,) = policy["spec"]["matchConditions"]
    assert f"system:serviceaccount:{account['namespace']}:{account['name']}" in cond["expression"]
    checks = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert "object.spec.audiences == ['istio-ca']" in checks and "boundObjectRef.kind == 'Pod'" in checks
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["serviceaccounts/token"]
    binding = _one("ValidatingAdmissionPolicyBinding")["spec"]
    assert binding == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    binding = _one("ClusterRoleBinding")
    account = _one("ServiceAccount")["metadata"]
    assert binding["roleRef"]["name"] == _one("ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                    "namespace": account["namespace"]}]  # fmt: skip
    assert _one("DaemonSet")["spec"]["template"]["spec"]["serviceAccountName"] == account["name"]


def test_the_image_is_the_one_build_image_builds() -> None:
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    script = (ROOT / "deploy" / "build-image.sh").read_text()
    assert "tag=${PLANEMESH_IMAGE:-localhost/planemesh:$version}" in script
    assert _container()["image"] == f"localhost/planemesh:{version}"


def test_the_arguments_are_flags_the_agent_accepts() -> None:
    agent = _container()
    argv = [*agent["command"][1:], *agent["args"]]
    args = build_parser(argv=argv).parse_args(argv)  # exits (SystemExit) on an unknown flag
    assert args.bootstrap == "/etc/planemesh/bootstrap.yaml" and args.pin_dir == "/sys/fs/bpf/planemesh"


def test_bootstrap_loads_and_asks_for_one_stream_per_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = yaml.safe_load(_one("ConfigMap")["data"]["bootstrap.yaml"])
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # what the kubelet sets in every pod
    monkeypatch.setenv(NODE_NAME_ENV, "worker-1")  # what the DaemonSet sets (checked below)
    boot = bootstrap_from_dict(raw)  # the agent's own parser
    settings = boot.workloads
    assert settings is not None and settings.source == "kubernetes" and settings.node_name == "worker-1"
    assert settings.kubernetes is not None and settings.kubernetes.api == "https://10.96.0.1:443"
    assert settings.kubernetes.token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    # istiod's TLS port, verified with istiod's root certificate (mounted from istio-ca-root-cert), each pod's
    # stream with its own token from the audience the agent's own projected token has
    assert boot.server == "istiod.istio-system.svc:15012" and boot.tls is not None
    assert boot.tls.ca == "/var/run/secrets/istio/root-cert.pem" and boot.tls.server_name == "istiod.istio-system.svc"
    tokens = settings.istiod_tokens
    assert tokens is not None and tokens.audience == "istio-ca"
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    volumes = {v["name"]: v for v in _one("DaemonSet")["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[tokens.dir]]["emptyDir"]["medium"] == "Memory"  # pods' tokens never on the host's disk
    assert volumes[mounts["/var/run/secrets/istio"]]["configMap"]["name"] == "istio-ca-root-cert"
    (projected,) = volumes[mounts["/var/run/secrets/tokens"]]["projected"]["sources"]
    assert projected["serviceAccountToken"]["audience"] == tokens.audience
    assert boot.token_file == "/var/run/secrets/tokens/" + projected["serviceAccountToken"]["path"]
    names = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in _container()["env"]}
    assert names[NODE_NAME_ENV] == "spec.nodeName"
    assert _one("DaemonSet")["spec"]["template"]["spec"]["automountServiceAccountToken"] is True  # the API token
