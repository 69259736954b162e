"""Classifier cost per packet vs. policy size, measured with BPF_PROG_TEST_RUN (no traffic leaves
the private namespace this script creates and removes).

    .venv/bin/python bench/tc_policy_scale.py [--rules 1 100 10000 20000] [--source-rules 0 1000 30000]

`--source-rules`: then, with 100 node rules, per-source rules (pm_src_policy: local workloads' outbound
configuration) of that many sources x one port each; the packets come from a source with rules and from one
without (0: the map is empty and its lookup skipped, the flag off).
"""

from __future__ import annotations

import argparse
import os
import secrets
import time

from pyroute2 import netns
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from planemesh.ebpf.abi import Action
from planemesh.ebpf.loader import Datapath
from planemesh.ebpf.policy import PolicyRule, SourceRule
from planemesh.ebpf.testrun import run_skb
from planemesh.labs.netns import call_in

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
PACKETS = {
    "v4 undeclared -> bypass": ETH / IP(dst="198.18.1.1") / TCP(dport=60000),
    "v4 prefix rule -> bypass": ETH / IP(dst="198.18.7.1") / TCP(dport=8080),
    "v4 SYN proxy, no listener": ETH / IP(dst="198.18.1.1") / TCP(dport=80),
    "v6 ACK proxy, no socket": ETH / IPv6(dst="fd00:18::1") / TCP(dport=80, flags="A"),
    "v4 SYN bypass": ETH / IP(dst="198.18.1.1") / TCP(dport=60000, flags="S"),  # walks pm_planes (listener ports)
    "v4 SYN to a proxy port: drop": ETH / IP(dst="198.18.1.1") / TCP(dport=15001, flags="S"),  # + FIB lookup
}


def rules_of(count: int) -> dict[PolicyRule, Action]:
    rules = {PolicyRule(5, 80): Action.PROXY, PolicyRule(5, 8080): Action.PROXY}
    port = 1000
    while len(rules) < count:
        rules[PolicyRule(5, port)] = Action.PROXY
        rules[PolicyRule(5, 8080, f"198.18.{port % 250}.0/24")] = Action.BYPASS
        port += 1
    return dict(list(rules.items())[:count])  # exactly `count` (1: the port-80 rule alone)


SOURCE_PACKETS = {
    "v4 from a workload, own bypass": ETH / IP(src="198.18.100.1", dst="198.18.1.1") / TCP(dport=9000),
    "v4 workload, node prefix rule": ETH / IP(src="198.18.100.1", dst="198.18.7.1") / TCP(dport=8080),
    "v4 no workload, undeclared": ETH / IP(src="198.18.200.1", dst="198.18.1.1") / TCP(dport=60000),
}


def source_rules_of(count: int) -> dict[SourceRule, Action]:
    """`count` sources in 198.18.100.0/22 onwards, each with a port-9000 rule (the kernel's per-source set)."""
    return {
        SourceRule(f"198.18.{100 + i // 250}.{1 + i % 250}", PolicyRule(5, 9000)): Action.SNIFF for i in range(count)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, nargs="+", default=[1, 100, 10000, 20000])
    parser.add_argument("--source-rules", type=int, nargs="*", default=[])
    parser.add_argument("--repeat", type=int, default=200_000)
    args = parser.parse_args()
    ns = f"{os.environ.get('PM_RUN_PREFIX', 'pmbench')}-tcscale-{secrets.token_hex(2)}"
    netns.create(ns)
    dp = Datapath()
    try:
        dp.set_interface(1, 5)  # BPF_PROG_TEST_RUN runs on the namespace's loopback (ifindex 1)
        dp.set_plane(5, 15001, 15002, Action.BYPASS)
        for count in args.rules:
            wanted = rules_of(count)
            started = time.perf_counter()
            result = dp.sync_policy(wanted)
            sync_s = time.perf_counter() - started
            print(f"{len(wanted)} rules: sync {sync_s * 1000:.0f} ms ({result})")
            for desc, pkt in PACKETS.items():
                run = call_in(ns, run_skb, dp.prog_fd, bytes(pkt), repeat=args.repeat)
                print(f"  {desc:30s} {run.duration_ns:5d} ns/packet")
        dp.sync_policy(rules_of(100))
        for count in args.source_rules:
            started = time.perf_counter()
            result = dp.sync_source_policy(source_rules_of(count))
            print(f"100 rules + {count} source rules: sync {(time.perf_counter() - started) * 1000:.0f} ms ({result})")
            for desc, pkt in {**PACKETS, **SOURCE_PACKETS}.items():
                run = call_in(ns, run_skb, dp.prog_fd, bytes(pkt), repeat=args.repeat)
                print(f"  {desc:30s} {run.duration_ns:5d} ns/packet")
        dp.sync_source_policy({})
    finally:
        dp.close()
        netns.remove(ns)


if __name__ == "__main__":
    main()
