"""The xDS bootstrap file, node identity, and the reconnect backoff (pure, no I/O)."""

from __future__ import annotations

import random

import pytest
from google.protobuf import json_format

from planemesh.model.config import ConfigError
from planemesh.xds.bootstrap import bootstrap_from_dict, load_bootstrap
from planemesh.xds.client_state import Mode
from planemesh.xds.transport import Backoff, node_identity

PLANES = [{"name": "oam", "id": 1, "interfaces": ["*-oam"], "cidrs": ["198.18.1.0/24", "fd00:18:1::/64"]}]


def boot(**server):
    return {
        "node": {"id": "node-7", "cluster": "edge"},
        "server": {"address": "127.0.0.1:18000", **server},
        "planes": PLANES,
    }


@pytest.mark.parametrize(
    "address", ["127.0.0.1:18000", "[fd00::1]:15010", "xds.example:443", "unix:///run/pm/ads.sock"]
)
def test_bootstrap_targets(address):
    b = bootstrap_from_dict(boot(address=address, mode="delta"))
    assert (b.server, b.mode, b.node_id, b.cluster) == (address, Mode.DELTA, "node-7", "edge")
    assert b.planes[0].name == "oam" and str(b.planes[0].cidrs[1]) == "fd00:18:1::/64"


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (boot(address="127.0.0.1"), "server.address"),
        (boot(address="127.0.0.1:99999"), "server.address"),
        (boot(mode="incremental"), "server.mode"),
        (boot(tls={"ca": "/ca.pem", "cert": "/c.pem"}), "server.tls"),
        (boot(retries=3), "server.retries"),
        ({**boot(), "node": {}}, "node.id"),
        ({**boot(), "planes": [{**PLANES[0], "cidrs": ["198.18.1.0/33"]}]}, "planes[0].cidrs[0]"),
        ({**boot(), "timing": {"backoff_base_s": -1}}, "timing.backoff_base_s"),
        ({**boot(), "host_mode": {"slices": ["not a slice"]}}, "host_mode.slices[0]"),
        ({**boot(), "host_mode": {"cgroup": ["/x"]}}, "host_mode.cgroup"),
        ([], "bootstrap"),
        (boot(token_file="relative/token"), "server.token_file"),
        (boot(max_receive_bytes=1000), "server.max_receive_bytes"),
        (boot(max_receive_bytes="64MiB"), "server.max_receive_bytes"),
        ({**boot(), "node": {"id": "n", "metadata": ["x"]}}, "node.metadata"),
        ({**boot(), "node": {"id": "n", "metadata": {"LABELS": {"app": object()}}}}, "node.metadata.LABELS"),
    ],
)
def test_bootstrap_errors_name_the_field(raw, path):
    with pytest.raises(ConfigError) as err:
        bootstrap_from_dict(raw)
    assert err.value.path.startswith(path)


def test_bootstrap_may_name_host_mode_cgroups(tmp_path):
    from planemesh.agent.agent_options import AgentOptions
    from planemesh.model.host_mode import host_mode_from_dict

    raw = {**boot(), "host_mode": {"slices": ["telecom.slice"], "cgroups": ["/apps/sig"]}}
    assert bootstrap_from_dict(raw).planes[0].name == "oam"
    assert host_mode_from_dict(raw["host_mode"]).slices == ("telecom.slice",)
    # the agent reads host_mode from the bootstrap when it has no static config
    assert AgentOptions(bootstrap=tmp_path / "b.yaml").host_mode_file == tmp_path / "b.yaml"


def test_load_bootstrap_reports_unreadable_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_bootstrap(tmp_path / "missing.yaml")
    (tmp_path / "b.yaml").write_text("node: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_bootstrap(tmp_path / "b.yaml")


def test_node_identity_lists_planes():
    node = node_identity(bootstrap_from_dict(boot()))
    meta = json_format.MessageToDict(node.metadata)
    assert (node.id, node.cluster, node.user_agent_name) == ("node-7", "edge", "planemesh")
    assert meta["planemesh.planes"] == [
        {"name": "oam", "id": 1, "interfaces": ["*-oam"], "cidrs": ["198.18.1.0/24", "fd00:18:1::/64"]}
    ]


def test_istiod_bootstrap_token_ca_limit_and_node_metadata():
    """What istio-agent gives Envoy: a CA for istiod's 15012, a service-account token, node metadata."""
    metadata = {
        "ISTIO_VERSION": "1.24.0",
        "NAMESPACE": "default",
        "SERVICE_ACCOUNT": "sleep",
        "INTERCEPTION_MODE": "TPROXY",
        "CLUSTER_ID": "Kubernetes",
        "LABELS": {"app": "sleep", "version": "v1"},
        "INSTANCE_IPS": "198.18.1.7,198.18.2.7",
    }
    raw = boot(
        address="istiod.istio-system.svc:15012",
        tls={"ca": "/var/run/secrets/istio/root-cert.pem", "server_name": "istiod.istio-system.svc"},
        token_file="/var/run/secrets/tokens/istio-token",
        max_receive_bytes=512 << 20,
    )
    b = bootstrap_from_dict(
        {**raw, "node": {"id": "sidecar~198.18.1.7~sleep-1.default~default.svc", "metadata": metadata}}
    )
    assert (b.token_file, b.max_receive_bytes) == ("/var/run/secrets/tokens/istio-token", 512 << 20)
    meta = json_format.MessageToDict(node_identity(b).metadata)
    assert {k: meta[k] for k in metadata} == metadata and "planemesh.planes" in meta
    assert bootstrap_from_dict(boot()).max_receive_bytes == 256 << 20  # the default


def test_backoff_grows_with_jitter_caps_and_resets():
    b = Backoff(0.5, 4.0, random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    caps = [0.5, 1, 2, 4, 4, 4, 4, 4]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert len({round(d, 6) for d in delays[3:]}) > 1  # jittered, not lock-step
    b.reset()
    assert b.next_delay() <= 0.5
