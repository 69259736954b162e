"""The xDS bootstrap file, node identity, and the reconnect backoff (pure, no I/O)."""

from __future__ import annotations

import random

import pytest
from google.protobuf import json_format

from planemesh.agent.config import ConfigError
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
    ],
)
def test_bootstrap_errors_name_the_field(raw, path):
    with pytest.raises(ConfigError) as err:
        bootstrap_from_dict(raw)
    assert err.value.path.startswith(path)


def test_bootstrap_may_name_host_mode_cgroups(tmp_path):
    from planemesh.agent.daemon import AgentOptions
    from planemesh.agent.host_mode import host_mode_from_dict

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


def test_backoff_grows_with_jitter_caps_and_resets():
    b = Backoff(0.5, 4.0, random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    caps = [0.5, 1, 2, 4, 4, 4, 4, 4]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert len({round(d, 6) for d in delays[3:]}) > 1  # jittered, not lock-step
    b.reset()
    assert b.next_delay() <= 0.5
