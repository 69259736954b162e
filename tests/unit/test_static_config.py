"""Static configuration: good files load, every kind of bad input names the field at fault."""

import copy

import pytest
import yaml

from planemesh.model.config import ConfigError, ListenerProtocol
from planemesh.model.planes import UndeclaredPorts, plane_of_address, plane_of_interface
from planemesh.model.static_config import default_config_text, load_static_config, snapshot_from_dict

GOOD = yaml.safe_load(default_config_text())


def test_default_config_loads_two_dual_stack_planes():
    snap = snapshot_from_dict(GOOD)
    assert [p.name for p in snap.planes] == ["oam", "media"]
    assert {(lsn.plane, lsn.port, lsn.protocol) for lsn in snap.listeners} >= {
        ("oam", 80, ListenerProtocol.HTTP),
        ("media", 9000, ListenerProtocol.TCP),
    }
    oam = snap.plane("oam")
    assert oam.undeclared is UndeclaredPorts.BYPASS
    assert oam.sla.connect_timeout_s == 2
    assert plane_of_address(snap.planes, "fd00:18:2::b").name == "media"
    assert plane_of_address(snap.planes, "::ffff:198.18.1.11").name == "oam"
    assert plane_of_address(snap.planes, "203.0.113.1") is None
    assert plane_of_interface(snap.planes, "server-media").name == "media"


def _bad(mutate):
    raw = copy.deepcopy(GOOD)
    mutate(raw)
    return raw


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (_bad(lambda d: d["planes"][0].update(cidrs=["198.18.1.0/40"])), "planes[0].cidrs[0]", "not a valid CIDR"),
        (_bad(lambda d: d["planes"][0].update(cidrs=["198.18.1.1"])), "planes[0].cidrs[0]", "prefix length"),
        (_bad(lambda d: d["planes"][1].update(cidrs=["198.18.1.128/25"])), "planes[1].cidrs[0]", "overlaps"),
        (_bad(lambda d: d["planes"][1].update(id=1)), "planes[1].id", "used by plane"),
        (_bad(lambda d: d["planes"][1].update(id=64)), "planes[1].id", "outside"),
        (_bad(lambda d: d["planes"][1].update(name="oam")), "planes[1].name", "defined twice"),
        (_bad(lambda d: d["planes"][1].update(interfaces=["*-oam"])), "planes[1].interfaces[0]", "already claimed"),
        (_bad(lambda d: d["planes"][1].update(proxy_port=15001)), "planes[1].proxy_port", "already the listener"),
        (_bad(lambda d: d["planes"][0].update(undeclared="drop")), "planes[0].undeclared", "not one of"),
        (_bad(lambda d: d["planes"][0].update(sla={"retries": "x"})), "planes[0].sla.retries", "expected a number"),
        (_bad(lambda d: d["planes"][0].update(sla={"bogus": 1})), "planes[0].sla.bogus", "unknown field"),
        (_bad(lambda d: d["planes"][0].pop("interfaces")), "planes[0].interfaces", "missing"),
        (_bad(lambda d: d["listeners"][0].update(plane="sig")), "listeners[0].plane", "unknown plane"),
        (_bad(lambda d: d["listeners"][0].update(port=70000)), "listeners[0].port", "not a TCP port"),
        (_bad(lambda d: d["listeners"][0].update(protocol="udp")), "listeners[0].protocol", "not one of"),
        (_bad(lambda d: d["listeners"].append({"plane": "oam", "port": 80})), "listeners[6]", "already declared"),
        (_bad(lambda d: d.update(extra=True)), "config.extra", "unknown field"),
        ([1, 2], "", "mapping"),
    ],
)
def test_bad_config_names_the_field(raw, field, words):
    with pytest.raises(ConfigError) as err:
        snapshot_from_dict(raw)
    assert err.value.path == field
    assert words in str(err.value)
    assert "\n" not in str(err.value)  # one line for the operator


def test_unreadable_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_static_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("planes: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_static_config(bad)


@pytest.mark.parametrize(
    ("version", "done"),
    [
        ("static:agent.yaml", True),
        ("xds:CDS=1", False),
        ("xds:CDS=1,EDS=3", False),
        ("xds:CDS=1,LDS=1", True),
        ("xds:CDS=2,EDS=1,LDS=7,RDS=1", True),
    ],
)
def test_ready_only_after_the_initial_listener_and_cluster_fetch(version, done):
    from planemesh.agent.daemon import initial_fetch_done
    from planemesh.model.static_config import load_default_config

    snap = load_default_config()
    assert initial_fetch_done(type(snap)(version=version, planes=snap.planes)) is done
