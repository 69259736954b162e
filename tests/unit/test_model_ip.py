"""model/ip.py against netaddr 1.x, which it replaced in the product (~2.1 MB of RSS per process): every
property the product reads, parsing (what is refused included), text, order, containment, pickling."""

from __future__ import annotations

import itertools
import pickle

import netaddr
import pytest

from planemesh.model.ip import AddrFormatError, IPAddress, IPNetwork

ADDRESSES = ["10.0.0.1", "0.0.0.0", "255.255.255.255", "192.168.1.200", "::", "::1", "fe80::1", "2001:db8::5",
             "::ffff:10.0.0.1", "::ffff:0:0", "::10.0.0.1", "2001:DB8::A", "1:2:3:4:5:6:7:8"]  # fmt: skip
NETWORKS = ["10.0.0.5/24", "10.0.0.0/8", "10.0.0.0/7", "0.0.0.0/0", "10.0.0.1", "10.0.0.1/32", "::/0",
            "::ffff:0:0/96", "2001:db8::5/64", "2001:db8::/32", "fe80::/10", "::1/128", "10.1.2.3/255.255.0.0",
            "192.168.0.0/16", "::ffff:10.0.0.0/104"]  # fmt: skip
BAD = ["10.1", "10/8", "fe80::1%eth0", "010.1.1.1", " 10.0.0.1", "10.0.0.1 ", "10.0.0.256", "10.0.0.0/33",
       "::/129", "", "abc", "1::2::3", "10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/8/8"]  # fmt: skip


@pytest.mark.parametrize("text", ADDRESSES)
def test_addresses_read_and_write_as_netaddr(text: str) -> None:
    ours, theirs = IPAddress(text), netaddr.IPAddress(text)
    assert (str(ours), ours.version, ours.value, int(ours)) == (str(theirs), theirs.version, theirs.value, int(theirs))
    assert ours.is_ipv4_mapped() == theirs.is_ipv4_mapped()
    if ours.version == 4 or ours.is_ipv4_mapped():
        assert str(ours.ipv4()) == str(theirs.ipv4())
    assert pickle.loads(pickle.dumps(ours)) == ours and hash(IPAddress(str(ours))) == hash(ours)


@pytest.mark.parametrize("text", NETWORKS)
def test_networks_read_and_write_as_netaddr(text: str) -> None:
    ours, theirs = IPNetwork(text, flags=0), netaddr.IPNetwork(text, flags=0)
    got = (str(ours), str(ours.cidr), str(ours.ip), str(ours.network), ours.version, ours.prefixlen, ours.first,
           ours.last, ours.size, str(ours[0]), str(ours[-1]))  # fmt: skip
    want = (str(theirs), str(theirs.cidr), str(theirs.ip), str(theirs.network), theirs.version, theirs.prefixlen,
            theirs.first, theirs.last, theirs.size, str(theirs[0]), str(theirs[-1]))  # fmt: skip
    assert got == want
    assert ours == ours.cidr and hash(ours) == hash(ours.cidr)  # netaddr: equal whatever the host bits
    assert pickle.loads(pickle.dumps(ours)) == ours and str(pickle.loads(pickle.dumps(ours))) == str(ours)


@pytest.mark.parametrize("text", BAD)
def test_what_netaddr_refuses_is_refused(text: str) -> None:
    with pytest.raises((netaddr.AddrFormatError, ValueError)):  # netaddr: ValueError for "10.0.0.0/8/8"
        netaddr.IPNetwork(text, flags=0)
    with pytest.raises(AddrFormatError):
        IPNetwork(text, flags=0)
    if "/" not in text:
        with pytest.raises(AddrFormatError):
            IPAddress(text)


def test_containment_equality_and_order_match_netaddr_across_versions() -> None:
    for a, n in itertools.product(ADDRESSES, NETWORKS):
        assert (IPAddress(a) in IPNetwork(n)) == (netaddr.IPAddress(a) in netaddr.IPNetwork(n)), (a, n)
    for m, n in itertools.product(NETWORKS, NETWORKS):
        assert (IPNetwork(m) in IPNetwork(n)) == (netaddr.IPNetwork(m) in netaddr.IPNetwork(n)), (m, n)
        assert (IPNetwork(m) == IPNetwork(n)) == (netaddr.IPNetwork(m) == netaddr.IPNetwork(n)), (m, n)
    assert [str(n) for n in sorted(map(IPNetwork, NETWORKS))] == [str(n) for n in sorted(map(netaddr.IPNetwork,
                                                                                              NETWORKS))]  # fmt: skip
    assert [str(a) for a in sorted(map(IPAddress, ADDRESSES))] == [str(a) for a in sorted(map(netaddr.IPAddress,
                                                                                              ADDRESSES))]  # fmt: skip
    with pytest.raises(AddrFormatError):
        IPAddress("2001:db8::1").ipv4()  # netaddr refuses too (not mapped)
