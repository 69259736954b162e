"""The classifier on real bytes (Katran-style fixtures): scapy-built packets run through the loaded
program with BPF_PROG_TEST_RUN, in a private netns (so socket lookups see only what we put there).

In test-run the skb has no socket context and is not "at TC ingress": bpf_sk_assign refuses, so
packets for which the program *found* a socket end in ASSIGN_FAILED (passed untouched). That proves
the lookups on real bytes; tests/bpf/test_ebpf_interception.py proves sk_assign for real.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.layers.l2 import ARP, Dot1Q, Ether

from planemesh.agent.proxy.sockets import make_listener_socket
from planemesh.ebpf.abi import PM_MARK_LOCAL, PM_MARK_OWN, Action, Reason
from planemesh.ebpf.policy import PolicyRule, SourceRule
from planemesh.ebpf.testrun import run_skb

pytestmark = pytest.mark.bpf

TC_ACT_OK, TC_ACT_SHOT = 0, 2
LO = 1  # BPF_PROG_TEST_RUN runs the packet on the namespace's loopback device
PLANE, FAIL_CLOSED_PLANE, SNIFF_PLANE, UNCONFIGURED_PLANE = 5, 6, 7, 9
CROSS_PLANE, ALLOWED_PLANE = 8, 10  # other planes' addresses: PLANE may forward to ALLOWED_PLANE only
PROXY_PORT, SNIFF_PORT = 15001, 15002
OTHER_PROXY_PORT, OTHER_SNIFF_PORT = 15011, 15012  # ALLOWED_PLANE's listeners
CLIENT4, SERVER4, OTHER4 = "198.18.0.2", "198.18.1.7", "198.18.9.7"
CLIENT6, SERVER6, OTHER6 = "fd00:18::2", "fd00:18:1::7", "fd00:18:9::7"
HOME4, CROSS4, CROSS6, ALLOWED4, ALLOWED6 = "198.18.5.7", "198.18.8.7", "fd00:18:8::7", "198.18.10.7", "fd00:18:a::7"
DESTINATIONS = {  # plane CIDRs -> plane (pm_dests); the addresses above them belong to no plane
    "198.18.5.0/24": PLANE,
    "fd00:18:5::/64": PLANE,
    "198.18.8.0/24": CROSS_PLANE,
    "fd00:18:8::/64": CROSS_PLANE,
    "198.18.10.0/24": ALLOWED_PLANE,
    "fd00:18:a::/64": ALLOWED_PLANE,
}

POLICY = {
    PolicyRule(PLANE, 80): Action.PROXY,
    PolicyRule(PLANE, 9000): Action.BYPASS,
    PolicyRule(PLANE, 8080): Action.PROXY,
    PolicyRule(PLANE, 8080, "198.18.9.0/24"): Action.BYPASS,  # the prefix beats the port rule
    PolicyRule(PLANE, 8080, "fd00:18:9::/64"): Action.BYPASS,
    PolicyRule(FAIL_CLOSED_PLANE, 80): Action.PROXY,
}

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def v4(dport: int, flags: str = "S", dst: str = SERVER4, src: str = CLIENT4, **ip: object) -> bytes:
    return bytes(ETH / IP(src=src, dst=dst, **ip) / TCP(sport=40000, dport=dport, flags=flags))


def v6(dport: int, flags: str = "S", dst: str = SERVER6, ext: object = None, src: str = CLIENT6) -> bytes:
    ip6 = IPv6(src=src, dst=dst)
    tcp = TCP(sport=40000, dport=dport, flags=flags)
    return bytes(ETH / (ip6 / ext / tcp if ext is not None else ip6 / tcp))


@dataclass
class Case:
    desc: str
    packet: bytes
    slots: tuple[int, ...]  # counter slots that must grow by one packet each
    retval: int = TC_ACT_OK
    mark_in: int = 0
    mark_out: int = 0
    plane: int = PLANE  # the plane lo belongs to in this case (0: lo is not a plane)
    extra: dict = field(default_factory=dict)


V4_SYN_80 = v4(80)
VLAN_V4_SYN_80 = bytes(ETH / Dot1Q(vlan=7) / IP(src=CLIENT4, dst=SERVER4) / TCP(dport=80, flags="S"))
# fmt: off
CASES = [
    Case("v4 SYN to a bypassed port", v4(9000), (Action.BYPASS,)),
    Case("v4 SYN to an undeclared port: the plane's default (bypass)", v4(5555), (Action.BYPASS,)),
    Case("v4 SYN to a proxied port, no listener: passes", V4_SYN_80, (Action.PROXY, Reason.NO_LISTENER)),
    Case("v4 ACK to a proxied port without a socket: old connection", v4(80, "A"), (Action.PROXY, Reason.NO_SOCKET)),
    Case("v4 SYN-ACK is not a new connection", v4(80, "SA"), (Action.PROXY, Reason.NO_SOCKET)),
    Case(
        "v4 with IP options: TCP found behind IHL",
        bytes(ETH / IP(src=CLIENT4, dst=SERVER4, options=b"\x94\x04\x00\x00" * 3) / TCP(dport=80, flags="S")),
        (Action.PROXY, Reason.NO_LISTENER),
    ),
    Case("802.1Q-tagged v4", bytes(ETH / Dot1Q(vlan=7) / IP(src=CLIENT4, dst=SERVER4) / TCP(dport=80)),
         (Action.PROXY, Reason.NO_LISTENER)),
    Case("v6 SYN to a proxied port", v6(80), (Action.PROXY, Reason.NO_LISTENER)),
    Case("v6 SYN to a bypassed port", v6(9000), (Action.BYPASS,)),
    Case("v6 behind hop-by-hop + destination options", v6(80, ext=IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()),
         (Action.PROXY, Reason.NO_LISTENER)),
    Case("v6 behind a routing header", v6(80, ext=IPv6ExtHdrRouting(addresses=[OTHER6])),
         (Action.PROXY, Reason.NO_LISTENER)),
    Case("v6 fragment passes", v6(80, ext=IPv6ExtHdrFragment(offset=0, m=1)), (Reason.FRAGMENT,)),
    Case("v4 first fragment (MF) passes", bytes(ETH / IP(src=CLIENT4, dst=SERVER4, flags="MF") / TCP(dport=80)),
         (Reason.FRAGMENT,)),
    Case("v4 later fragment passes", bytes(ETH / IP(src=CLIENT4, dst=SERVER4, frag=10, proto=6) / (b"x" * 20)),
         (Reason.FRAGMENT,)),
    Case("v4 UDP is not TCP", bytes(ETH / IP(src=CLIENT4, dst=SERVER4) / UDP(dport=80)), (Reason.NOT_TCP,)),
    Case("v4 ICMP is not TCP", bytes(ETH / IP(src=CLIENT4, dst=SERVER4) / ICMP()), (Reason.NOT_TCP,)),
    Case("v6 UDP is not TCP", bytes(ETH / IPv6(src=CLIENT6, dst=SERVER6) / UDP(dport=80)), (Reason.NOT_TCP,)),
    Case("ARP is not IP", bytes(ETH / ARP(pdst=SERVER4)), (Reason.NOT_IP,)),
    Case("v4 truncated before the TCP header", V4_SYN_80[:14 + 20 + 8], (Reason.PARSE_ERROR,)),
    # BPF_PROG_TEST_RUN itself refuses an IP EtherType with less than a full IP header, so the
    # shortest truncations ride behind an 802.1Q tag (which the kernel does not look into there).
    Case("v4 truncated inside the IP header (tagged)", VLAN_V4_SYN_80[:18 + 12], (Reason.PARSE_ERROR,)),
    Case("v4 with IHL < 5", V4_SYN_80[:14] + bytes([0x43]) + V4_SYN_80[15:], (Reason.PARSE_ERROR,)),
    Case("IPv4 EtherType carrying version 6", V4_SYN_80[:14] + bytes([0x65]) + V4_SYN_80[15:],
         (Reason.PARSE_ERROR,)),
    Case("TCP data offset < 5", bytes(ETH / IP(src=CLIENT4, dst=SERVER4) / TCP(dport=80, dataofs=2)),
         (Reason.PARSE_ERROR,)),
    Case("v6 truncated header (tagged)", bytes(ETH / Dot1Q(vlan=7) / IPv6(src=CLIENT6, dst=SERVER6) / TCP())[:18 + 30],
         (Reason.PARSE_ERROR,)),
    Case("garbage after an Ethernet header", bytes(ETH)[:12] + b"\x08\x00" + b"\xff" * 40, (Reason.PARSE_ERROR,)),
    Case("802.1Q EtherType without the tag", bytes(ETH)[:12] + b"\x81\x00", (Reason.PARSE_ERROR,)),
    Case("unknown ifindex: not a plane", V4_SYN_80, (Reason.NO_PLANE,), plane=0),
    Case("plane without settings: passes", V4_SYN_80, (Reason.UNCONFIGURED,), plane=UNCONFIGURED_PLANE),
    Case("own-traffic mark passes untouched", V4_SYN_80, (Reason.OWN_TRAFFIC,), mark_in=PM_MARK_OWN | 0x7,
         mark_out=PM_MARK_OWN | 0x7),
    Case("prefix rule beats the port rule (v4)", v4(8080, dst=OTHER4), (Action.BYPASS,)),
    Case("port rule outside the prefix (v4)", v4(8080), (Action.PROXY, Reason.NO_LISTENER)),
    Case("prefix rule beats the port rule (v6)", v6(8080, dst=OTHER6), (Action.BYPASS,)),
    Case("port rule outside the prefix (v6)", v6(8080), (Action.PROXY, Reason.NO_LISTENER)),
    Case("fail-closed plane without a listener drops", V4_SYN_80, (Action.PROXY, Action.DROP), retval=TC_ACT_SHOT,
         plane=FAIL_CLOSED_PLANE),
    Case("fail-closed plane: a non-SYN without socket still passes", v4(80, "A"),
         (Action.PROXY, Reason.NO_SOCKET), plane=FAIL_CLOSED_PLANE),
    Case("undeclared port on a sniffing plane", v4(5555), (Action.SNIFF, Reason.NO_LISTENER), plane=SNIFF_PLANE),
    Case("v6 undeclared port on a sniffing plane", v6(5555),
         (Action.SNIFF, Reason.NO_LISTENER), plane=SNIFF_PLANE),
    # Cross-plane policy: a new connection to another plane's address needs the plane's permission.
    Case("v4 SYN to another plane's address: dropped, even on a bypassed port", v4(9000, dst=CROSS4),
         (Reason.CROSS_PLANE_DROP,), retval=TC_ACT_SHOT),
    Case("v6 SYN to another plane's address: dropped before interception", v6(80, dst=CROSS6),
         (Reason.CROSS_PLANE_DROP,), retval=TC_ACT_SHOT),
    Case("v4 SYN to another plane on a sniffing plane: dropped", v4(5555, dst=CROSS4),
         (Reason.CROSS_PLANE_DROP,), retval=TC_ACT_SHOT, plane=SNIFF_PLANE),
    Case("v4 SYN-ACK to another plane (a reply) passes", v4(9000, "SA", dst=CROSS4), (Action.BYPASS,)),
    Case("v6 ACK to another plane (not a new connection) passes", v6(9000, "A", dst=CROSS6), (Action.BYPASS,)),
    Case("v4 SYN to a plane it may forward to: bypassed, counted", v4(9000, dst=ALLOWED4),
         (Reason.CROSS_PLANE, Action.BYPASS)),
    Case("v6 SYN to a plane it may forward to: proxied, counted", v6(80, dst=ALLOWED6),
         (Reason.CROSS_PLANE, Action.PROXY, Reason.NO_LISTENER)),
    Case("permission is one-way: the allowed plane may not come back", v4(9000, dst=HOME4),
         (Reason.CROSS_PLANE_DROP,), retval=TC_ACT_SHOT, plane=ALLOWED_PLANE),
    Case("SYN to its own plane's address is no cross-plane", v4(9000, dst=HOME4), (Action.BYPASS,)),
    Case("SYN to an address of no plane passes", v4(9000, dst="198.18.200.1"), (Action.BYPASS,)),
    Case("own traffic to another plane passes untouched", v4(9000, dst=CROSS4), (Reason.OWN_TRAFFIC,),
         mark_in=PM_MARK_OWN | 0x8, mark_out=PM_MARK_OWN | 0x8),
    # The listeners are reached by interception only. The test netns forwards nothing, so every destination
    # is the node's own here (test_listener_port_drop_is_for_node_addresses_only covers transit).
    Case("v4 SYN straight to the plane's proxy port: dropped", v4(PROXY_PORT),
         (Reason.LISTENER_PORT_DROP,), retval=TC_ACT_SHOT),
    Case("v6 SYN straight to the plane's sniff port: dropped", v6(SNIFF_PORT),
         (Reason.LISTENER_PORT_DROP,), retval=TC_ACT_SHOT),
    Case("v4 SYN straight to another plane's proxy port: dropped", v4(OTHER_PROXY_PORT, dst=HOME4),
         (Reason.LISTENER_PORT_DROP,), retval=TC_ACT_SHOT),
    Case("v6 SYN straight to another plane's sniff port: dropped", v6(OTHER_SNIFF_PORT),
         (Reason.LISTENER_PORT_DROP,), retval=TC_ACT_SHOT, plane=SNIFF_PLANE),
    Case("v4 ACK to a proxy port (not a new connection) follows the policy", v4(PROXY_PORT, "A"), (Action.BYPASS,)),
    Case("own traffic to a proxy port passes untouched", v4(PROXY_PORT), (Reason.OWN_TRAFFIC,),
         mark_in=PM_MARK_OWN | 0x5, mark_out=PM_MARK_OWN | 0x5),
    Case("a port that is no active plane's listener is not refused", v4(15021), (Action.BYPASS,)),
]
# fmt: on


@pytest.fixture
def configured(datapath):
    datapath.set_marks(PM_MARK_LOCAL, PM_MARK_OWN, mark_planes=False)
    datapath.set_plane(FAIL_CLOSED_PLANE, PROXY_PORT, SNIFF_PORT, Action.BYPASS, fail_closed=True)
    datapath.set_plane(SNIFF_PLANE, PROXY_PORT, SNIFF_PORT, Action.SNIFF)
    datapath.set_plane(PLANE, PROXY_PORT, SNIFF_PORT, Action.BYPASS, forward_to=frozenset({ALLOWED_PLANE}))
    datapath.set_plane(ALLOWED_PLANE, OTHER_PROXY_PORT, OTHER_SNIFF_PORT, Action.BYPASS)
    datapath.clear_plane(UNCONFIGURED_PLANE)
    datapath.sync_policy(POLICY)
    datapath.sync_destinations(DESTINATIONS)
    yield datapath
    datapath.sync_policy({})
    datapath.sync_destinations({})
    datapath.clear_interface(LO)


def _delta(before: dict, after: dict) -> dict:
    return {k: (v[0] - before.get(k, (0, 0))[0]) for k, v in after.items() if v[0] != before.get(k, (0, 0))[0]}


@pytest.mark.parametrize("case", CASES, ids=[c.desc for c in CASES])
def test_fixture(case: Case, configured, netns_worker) -> None:
    dp = configured
    if case.plane:
        dp.set_interface(LO, case.plane)
    else:
        dp.clear_interface(LO)
    before = dp.counters()
    result = netns_worker.call(run_skb, dp.prog_fd, case.packet, mark=case.mark_in)
    assert result.retval == case.retval
    assert result.mark == case.mark_out
    assert result.data == case.packet  # the classifier never rewrites packets
    counted_plane = case.plane
    assert _delta(before, dp.counters()) == {(counted_plane, int(slot)): 1 for slot in case.slots}


def test_destinations_and_forward_sets_read_back(configured) -> None:
    assert configured.destinations() == DESTINATIONS
    assert configured.planes()[PLANE].forward_to == {ALLOWED_PLANE}
    assert configured.planes()[ALLOWED_PLANE].forward_to == frozenset()
    result = configured.sync_destinations({"198.18.5.0/24": PLANE, "198.18.8.9/24": CROSS_PLANE})
    assert (result.added, result.updated, result.deleted) == (0, 0, 4)  # 198.18.8.9/24 is 198.18.8.0/24
    assert configured.sync_destinations({"198.18.5.0/24": CROSS_PLANE}).updated == 1


# Per-source rules (a local workload's outbound configuration): CLIENT4's own 9000 is inspected, its 8080 to
# OTHER4's /24 proxied (the node bypasses it); CLIENT6's 80 to SERVER6 is bypassed (the node proxies it).
SOURCE_POLICY = {
    SourceRule(CLIENT4, PolicyRule(PLANE, 9000)): Action.SNIFF,
    SourceRule(CLIENT4, PolicyRule(PLANE, 8080, "198.18.9.0/24")): Action.PROXY,
    SourceRule(CLIENT6, PolicyRule(PLANE, 80, SERVER6 + "/128")): Action.BYPASS,
}
OTHER_CLIENT4, OTHER_CLIENT6 = "198.18.0.3", "fd00:18::3"
# fmt: off
SOURCE_CASES = [
    ("v4 source's own rule", v4(9000), (Action.SNIFF, Reason.NO_LISTENER)),
    ("v4 other source: the node's rule", v4(9000, src=OTHER_CLIENT4), (Action.BYPASS,)),
    ("v4 source's own prefix rule", v4(8080, dst=OTHER4), (Action.PROXY, Reason.NO_LISTENER)),
    ("v4 other source: the node's prefix rule", v4(8080, dst=OTHER4, src=OTHER_CLIENT4), (Action.BYPASS,)),
    ("v4 source without a rule for the port: the node's", v4(80), (Action.PROXY, Reason.NO_LISTENER)),
    ("v6 source's own host rule", v6(80), (Action.BYPASS,)),
    ("v6 source, another destination: the node's", v6(80, dst=OTHER6), (Action.PROXY, Reason.NO_LISTENER)),
    ("v6 other source: the node's", v6(80, src=OTHER_CLIENT6), (Action.PROXY, Reason.NO_LISTENER)),
]
# fmt: on


@pytest.mark.parametrize(("desc", "packet", "slots"), SOURCE_CASES, ids=[c[0] for c in SOURCE_CASES])
def test_source_rules(configured, netns_worker, desc: str, packet: bytes, slots: tuple) -> None:
    configured.set_interface(LO, PLANE)
    configured.sync_source_policy(SOURCE_POLICY)
    try:
        before = configured.counters()
        assert netns_worker.call(run_skb, configured.prog_fd, packet).retval == TC_ACT_OK
        assert _delta(before, configured.counters()) == {(PLANE, int(slot)): 1 for slot in slots}, desc
    finally:
        configured.sync_source_policy({})


def test_source_rules_read_back_and_gate_the_lookup(configured, netns_worker) -> None:
    """The rules decode to what was written; with none left the flag is off and the node's rules decide."""
    configured.set_interface(LO, PLANE)
    assert configured.sync_source_policy(SOURCE_POLICY).added == 3
    assert configured.source_policy() == SOURCE_POLICY
    assert configured.sync_source_policy({}).deleted == 3
    before = configured.counters()
    netns_worker.call(run_skb, configured.prog_fd, v4(9000))
    assert _delta(before, configured.counters()) == {(PLANE, int(Action.BYPASS)): 1}


def test_counters_count_bytes(configured, netns_worker) -> None:
    configured.set_interface(LO, PLANE)
    before = configured.counters()
    netns_worker.call(run_skb, configured.prog_fd, v4(9000), repeat=3)
    after = configured.counters()
    key = (PLANE, int(Action.BYPASS))
    base = before.get(key, (0, 0))
    assert after[key] == (base[0] + 3, base[1] + 3 * len(v4(9000)))


def test_mark_planes_sets_the_plane_bits_on_bypass(configured, netns_worker) -> None:
    configured.set_interface(LO, PLANE)
    configured.set_marks(PM_MARK_LOCAL, PM_MARK_OWN, mark_planes=True)
    try:
        result = netns_worker.call(run_skb, configured.prog_fd, v4(9000), mark=0x1000)
    finally:
        configured.set_marks(PM_MARK_LOCAL, PM_MARK_OWN, mark_planes=False)
    assert result.mark == 0x1000 | PLANE


def _listen(addr: str, port: int) -> socket.socket:
    sock = make_listener_socket(port, transparent=False, host=addr, backlog=8)
    sock.setblocking(True)
    return sock


def test_syn_finds_the_dual_stack_listener(configured, netns_worker) -> None:
    """With the plane's [::] listener present the SYN's listener lookup succeeds for v4 (as
    127.0.0.1) and v6 (as ::1); test-run cannot assign, which the program reports and passes."""
    configured.set_interface(LO, PLANE)

    def scenario() -> list:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("set", index=LO, state="up")
        listener = _listen("::", PROXY_PORT)
        try:
            return [run_skb(configured.prog_fd, pkt) for pkt in (v4(80), v6(80))]
        finally:
            listener.close()

    before = configured.counters()
    results = netns_worker.call(scenario)
    assert [(r.retval, r.mark) for r in results] == [(TC_ACT_OK, 0), (TC_ACT_OK, 0)]
    assert _delta(before, configured.counters()) == {
        (PLANE, int(Action.PROXY)): 2,
        (PLANE, int(Reason.ASSIGN_FAILED)): 2,
    }


def test_established_socket_is_found_by_its_own_4tuple(configured, netns_worker) -> None:
    """A non-SYN whose 4-tuple is a real established connection: found (then test-run refuses to
    assign); the same packet with another source port has no socket and passes as NO_SOCKET."""
    configured.set_interface(LO, PLANE)

    def scenario() -> list:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("set", index=LO, state="up")
        server = _listen("127.0.0.1", 80)
        client = socket.create_connection(("127.0.0.1", 80), timeout=5)
        conn, _ = server.accept()
        try:
            cport = client.getsockname()[1]
            pkt = bytes(ETH / IP(src="127.0.0.1", dst="127.0.0.1") / TCP(sport=cport, dport=80, flags="A"))
            other = bytes(ETH / IP(src="127.0.0.1", dst="127.0.0.1") / TCP(sport=cport ^ 1, dport=80, flags="A"))
            return [run_skb(configured.prog_fd, pkt), run_skb(configured.prog_fd, other)]
        finally:
            for s in (conn, client, server):
                s.close()

    before = configured.counters()
    results = netns_worker.call(scenario)
    assert [r.retval for r in results] == [TC_ACT_OK, TC_ACT_OK]
    assert _delta(before, configured.counters()) == {
        (PLANE, int(Action.PROXY)): 2,
        (PLANE, int(Reason.ASSIGN_FAILED)): 1,
        (PLANE, int(Reason.NO_SOCKET)): 1,
    }


def _is_local_route(ipr, address: str) -> bool:
    """Whether the kernel routes `address` as one of its own (RTN_LOCAL) in the caller's namespace."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return ipr.route("get", dst=address, family=socket.AF_INET6)[0]["type"] == 2  # RTN_LOCAL
    except NetlinkError:  # no route at all yet
        return False


def test_listener_port_drop_is_for_node_addresses_only(configured, netns_worker) -> None:
    """With forwarding on, a SYN to an address of the node at a proxy port is dropped, while a SYN to a proxy
    port of a forwarded (transit) destination follows the policy as before; v4 and v6."""
    configured.set_interface(LO, PLANE)
    node4, node6, far4, far6 = "198.18.0.1", "fd00:18::1", "203.0.113.9", "2001:db8::9"

    def scenario() -> list:
        from pyroute2 import IPRoute

        for name in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
            with open(f"/proc/sys/{name}", "w") as f:  # this thread's netns: the test's own
                f.write("1")
        with IPRoute() as ipr:
            ipr.link("set", index=LO, state="up")
            ipr.addr("add", index=LO, address=node4, prefixlen=32)
            ipr.addr("add", index=LO, address=node6, prefixlen=128, flags=0x02)  # IFA_F_NODAD
            ipr.route("add", dst="203.0.113.0/24", type="blackhole")  # forwarded (refused) elsewhere
            ipr.route("add", dst="2001:db8::/32", type="blackhole", family=socket.AF_INET6)
            # IPv6 puts an address's local route in from a workqueue, even with NODAD: a busy machine may run
            # the packets before it (the SYN to node6 then looked like a transit one), so wait for the route.
            deadline = time.monotonic() + 5
            while not _is_local_route(ipr, node6):
                assert time.monotonic() < deadline, "node6's local route never appeared"
                time.sleep(0.01)
        packets = [v4(PROXY_PORT, dst=node4), v6(OTHER_PROXY_PORT, dst=node6), v4(PROXY_PORT, dst=far4),
                   v6(SNIFF_PORT, dst=far6)]
        return [run_skb(configured.prog_fd, pkt).retval for pkt in packets]

    before = configured.counters()
    assert netns_worker.call(scenario) == [TC_ACT_SHOT, TC_ACT_SHOT, TC_ACT_OK, TC_ACT_OK]
    assert _delta(before, configured.counters()) == {
        (PLANE, int(Reason.LISTENER_PORT_DROP)): 2,
        (PLANE, int(Action.BYPASS)): 2,  # transit: the plane's undeclared action
    }


def test_drop_orphans_drops_a_segment_whose_socket_is_gone(configured, netns_worker) -> None:
    """HBONE's capture plane (agent/hbone/capture.py): a non-SYN of an intercepted flow without its socket (the
    node holding it died) is dropped, not routed in plaintext; without the flag it passes as before."""
    dp = configured
    dp.set_interface(LO, FAIL_CLOSED_PLANE)
    for orphans, retval, slots in ((False, TC_ACT_OK, (Action.PROXY, Reason.NO_SOCKET)),
                                   (True, TC_ACT_SHOT, (Action.PROXY, Action.DROP))):  # fmt: skip
        dp.set_plane(FAIL_CLOSED_PLANE, PROXY_PORT, SNIFF_PORT, Action.BYPASS, fail_closed=True, drop_orphans=orphans)
        for packet in (v4(80, "A"), v6(80, "PA")):
            before = dp.counters()
            assert netns_worker.call(run_skb, dp.prog_fd, packet).retval == retval
            assert _delta(before, dp.counters()) == {(FAIL_CLOSED_PLANE, int(s)): 1 for s in slots}
    dp.set_plane(FAIL_CLOSED_PLANE, PROXY_PORT, SNIFF_PORT, Action.BYPASS, fail_closed=True)
