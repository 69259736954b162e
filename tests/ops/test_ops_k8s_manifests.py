"""The DaemonSet manifests against the Kubernetes OpenAPI schemas (offline, kubernetes-validate), plus the
parts of the contract a schema cannot see: probes on loopback, capabilities, mounts, a bootstrap that loads."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from planemesh.agent.admin import DEFAULT_ADMIN_PORT, parse_admin_bind
from planemesh.xds.bootstrap import bootstrap_from_dict

kubernetes_validate = pytest.importorskip("kubernetes_validate")

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "planemesh-daemonset.yaml"
K8S_VERSIONS = ("1.30.0", "1.33.0")  # appArmorProfile is a field since 1.30


def _docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _by_kind(kind: str) -> dict:
    (doc,) = [d for d in _docs() if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_strictly(version):
    kinds = []
    for doc in _docs():
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["ConfigMap", "DaemonSet", "Namespace", "ServiceAccount"]


@pytest.mark.parametrize(
    "breakage",
    [
        lambda ds: ds["spec"]["template"]["spec"].update(hostNetwrok=True),  # a typo strict mode must catch
        lambda ds: ds["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(port=[1]),
        lambda ds: ds["spec"]["template"]["spec"].pop("containers"),
    ],
)
def test_the_validator_catches_broken_manifests(breakage):
    ds = copy.deepcopy(_by_kind("DaemonSet"))
    breakage(ds)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[0], strict=True)


def test_daemonset_contract():
    pod = _by_kind("DaemonSet")["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["automountServiceAccountToken"] is False
    caps = agent["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and {"BPF", "NET_ADMIN", "PERFMON"} <= set(caps["add"])
    assert agent["securityContext"]["privileged"] is False
    binds = [parse_admin_bind(a.split("=", 1)[1]) for a in agent["args"] if a.startswith("--admin=")]
    assert any(b.host == "127.0.0.1" and b.port == DEFAULT_ADMIN_PORT for b in binds)
    for probe, path in (("readinessProbe", "/ready"), ("startupProbe", "/ready"), ("livenessProbe", "/healthz")):
        get = agent[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == ("127.0.0.1", DEFAULT_ADMIN_PORT, path)
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in agent["env"]}
    assert env["PLANEMESH_NODE_ID"] == "spec.nodeName" and env["PLANEMESH_NODE_IP"] == "status.hostIP"
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    host_paths = {path: volumes[m["name"]].get("hostPath", {}).get("path") for path, m in mounts.items()}
    assert host_paths["/sys/fs/bpf"] == "/sys/fs/bpf" and not mounts["/sys/fs/bpf"].get("readOnly")
    assert host_paths["/sys/fs/cgroup"] == "/sys/fs/cgroup" and host_paths["/run/netns"] == "/run/netns"
    assert host_paths["/host/proc"] == "/proc" and host_paths["/lib/modules"] == "/lib/modules"


def test_configmap_bootstrap_loads_with_the_agents_own_parser():
    bootstrap = bootstrap_from_dict(yaml.safe_load(_by_kind("ConfigMap")["data"]["bootstrap.yaml"]))
    assert [p.name for p in bootstrap.planes] == ["oam", "media"]
    mount = next(m for m in _by_kind("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                 if m["name"] == "config")  # fmt: skip
    assert mount["mountPath"] == "/etc/planemesh"
