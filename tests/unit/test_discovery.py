"""Interface classification: by name pattern, or (`@routed`) by the host routes to a plane's pods."""

from planemesh.model.ip import IPNetwork
from planemesh.model.planes import ROUTED, Plane
from planemesh.netplanes.discovery import LinkFacts, classify, diff, plane_source_addresses

OAM = Plane("oam", 1, ("*-oam",), (IPNetwork("198.18.1.0/24"), IPNetwork("fd00:18:1::/64")))
SIG = Plane("sig", 3, (ROUTED,), (IPNetwork("fd00:18:3::/64"),))
MEDIA = Plane("media", 2, (ROUTED, "eth-media"), (IPNetwork("198.18.2.0/24"),))


def test_name_patterns_and_routes_classify_links():
    links = [
        LinkFacts(2, "client-oam", True, ("198.18.1.1",)),
        LinkFacts(3, "veth9f3a1c", True, (), routed=("fd00:18:3::a",)),  # a Multus veth: random name
        LinkFacts(4, "veth77d0e2", True, (), routed=("198.18.2.10",)),
        LinkFacts(5, "veth000001", True, (), routed=("203.0.113.7",)),  # routes to no plane: not ours
        LinkFacts(6, "eth-media", True, ("198.18.2.1",)),
        LinkFacts(7, "eth0", True, ("192.0.2.10",)),
    ]
    found = classify(links, (OAM, SIG, MEDIA))
    assert {i: p.plane for i, p in found.items()} == {2: "oam", 3: "sig", 4: "media", 6: "media"}


def test_a_routed_plane_never_claims_by_name():
    assert not SIG.claims_interface("@routed")
    assert classify([LinkFacts(9, "@routed", True, ())], (SIG,)) == {}


def test_diff_and_source_addresses():
    old = classify([LinkFacts(2, "a-oam", True, ("198.18.1.1",))], (OAM,))
    new = classify(
        [LinkFacts(2, "a-oam", True, ("198.18.1.1", "fd00:18:1::1")), LinkFacts(5, "b-oam", True, ())], (OAM,)
    )
    change = diff(old, new)
    assert [i.ifindex for i in change.added] == [5] and [i.ifindex for i in change.changed] == [2]
    assert not change.removed
    assert plane_source_addresses(new.values(), (OAM,)) == {"oam": {4: "198.18.1.1", 6: "fd00:18:1::1"}}


def test_an_interface_two_planes_claim_belongs_to_neither():
    oam = Plane("oam", 1, ("*-oam",), (IPNetwork("198.18.1.0/24"),))
    clients = Plane("clients", 4, ("client-*",), (IPNetwork("198.18.4.0/24"),))
    links = [LinkFacts(2, "client-oam", True, ()), LinkFacts(3, "server-oam", True, ())]
    assert {i: p.plane for i, p in classify(links, (oam, clients)).items()} == {3: "oam"}
