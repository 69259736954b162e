import pytest

from planemesh.labs.model import lab_from_dict
from planemesh.model.config import ConfigError

GOOD = {
    "name": "t",
    "planes": [
        {"name": "oam", "ipv4": "198.18.1.0/24", "ipv6": "fd00:18:1::/64"},
        {"name": "sig", "ipv6": "fd00:18:3::/64"},
    ],
    "pods": [{"name": "a", "planes": ["oam", "sig"]}, {"name": "b", "planes": ["oam"]}],
}


def test_addresses_follow_pod_order_and_plane_subnets():
    spec = lab_from_dict(GOOD)
    assert spec.node_address("oam", 4) == "198.18.1.1"
    assert spec.pod_address("a", "oam", 4) == "198.18.1.10"
    assert spec.pod_address("b", "oam", 6) == "fd00:18:1::b"
    assert spec.pod_address("a", "sig", 4) is None  # IPv6-only plane
    with pytest.raises(KeyError):
        spec.pod_address("b", "sig", 6)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(name="Bad Name"), "name"),
        (lambda d: d["planes"][0].update(ipv4="198.18.1.0/33"), "planes[0].ipv4"),
        (lambda d: d["planes"][0].update(ipv4="fd00::/64"), "planes[0].ipv4"),
        (lambda d: d["planes"][1].update(name="oam"), "planes[1].name"),
        (lambda d: d["pods"][1].update(planes=["nope"]), "pods[1].planes[0]"),
        (lambda d: d["pods"][1].update(name="node"), "pods[1].name"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["planes"].clear(), "planes"),
    ],
)
def test_bad_lab_names_the_field(mutate, field):
    import copy

    raw = copy.deepcopy(GOOD)
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        lab_from_dict(raw)
    assert err.value.path == field
    assert str(err.value).startswith(field)
