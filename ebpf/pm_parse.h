/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Packet parsing for the TC ingress program: Ethernet (+ one 802.1Q/802.1ad tag), IPv4 (options via
 * IHL), IPv6 (common extension headers skipped in a bounded loop), TCP. Every pointer is checked
 * against data_end before it is read. No helper here moves packet data; a caller that calls one that
 * does (bpf_skb_pull_data, bpf_skb_change_*) must parse again.
 *
 * Verifier workarounds are marked "VERIFIER:" so they can be found with grep.
 */
#ifndef PM_PARSE_H
#define PM_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>

#include "pm_abi.h"

#define PM_ETH_P_8021Q 0x8100
#define PM_ETH_P_8021AD 0x88a8
#define PM_IP_MF 0x2000
#define PM_IP_OFFSET 0x1fff
#define PM_V6_MAX_EXT 6           /* extension headers skipped before giving up (PARSE_ERROR) */
#define PM_MAX_L4_OFFSET 1024     /* no sane header chain is longer; bounds the offset for the verifier */

/* What the classifier needs from a packet; addresses and ports in network order. */
struct pm_pkt {
	__u8 family; /* PM_FAMILY_V4 / PM_FAMILY_V6 */
	__u8 syn;    /* SYN set and ACK clear: a new connection */
	__be16 sport;
	__be16 dport;
	__u16 pad;
	__u8 saddr[16]; /* IPv4 in [0..3] */
	__u8 daddr[16];
};

/* Returns 0 and fills *pkt, or the enum pm_reason that explains why the packet is not classified. */
static __always_inline int pm_parse_tcp(void *data, void *data_end, __u32 l4_off, struct pm_pkt *pkt)
{
	/* VERIFIER: a variable offset into the packet must carry a visible upper bound. */
	if (l4_off > PM_MAX_L4_OFFSET)
		return PM_RSN_PARSE_ERROR;
	struct tcphdr *tcp = data + l4_off;
	if ((void *)(tcp + 1) > data_end)
		return PM_RSN_PARSE_ERROR;
	if (tcp->doff < 5)
		return PM_RSN_PARSE_ERROR;
	pkt->sport = tcp->source;
	pkt->dport = tcp->dest;
	pkt->syn = tcp->syn && !tcp->ack;
	return 0;
}

static __always_inline int pm_parse_ipv4(void *data, void *data_end, __u32 off, struct pm_pkt *pkt)
{
	struct iphdr *ip = data + off;
	if ((void *)(ip + 1) > data_end)
		return PM_RSN_PARSE_ERROR;
	if (ip->version != 4 || ip->ihl < 5)
		return PM_RSN_PARSE_ERROR;
	__u32 hlen = ip->ihl * 4;
	if ((void *)ip + hlen > data_end)
		return PM_RSN_PARSE_ERROR;
	if (ip->frag_off & bpf_htons(PM_IP_MF | PM_IP_OFFSET))
		return PM_RSN_FRAGMENT;
	if (ip->protocol != IPPROTO_TCP)
		return PM_RSN_NOT_TCP;
	pkt->family = PM_FAMILY_V4;
	__builtin_memcpy(pkt->saddr, &ip->saddr, 4);
	__builtin_memcpy(pkt->daddr, &ip->daddr, 4);
	return pm_parse_tcp(data, data_end, off + hlen, pkt);
}

static __always_inline int pm_parse_ipv6(void *data, void *data_end, __u32 off, struct pm_pkt *pkt)
{
	struct ipv6hdr *ip6 = data + off;
	if ((void *)(ip6 + 1) > data_end)
		return PM_RSN_PARSE_ERROR;
	if (ip6->version != 6)
		return PM_RSN_PARSE_ERROR;
	pkt->family = PM_FAMILY_V6;
	__builtin_memcpy(pkt->saddr, &ip6->saddr, 16);
	__builtin_memcpy(pkt->daddr, &ip6->daddr, 16);
	__u8 nexthdr = ip6->nexthdr;
	off += sizeof(*ip6);

	/* VERIFIER: a bounded, unrolled loop; older verifiers reject back-edges. */
#pragma unroll
	for (int i = 0; i < PM_V6_MAX_EXT; i++) {
		if (nexthdr == IPPROTO_TCP)
			return pm_parse_tcp(data, data_end, off, pkt);
		if (nexthdr == IPPROTO_FRAGMENT)
			return PM_RSN_FRAGMENT;
		if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING && nexthdr != IPPROTO_DSTOPTS &&
		    nexthdr != IPPROTO_AH)
			return PM_RSN_NOT_TCP; /* ESP, UDP, ICMPv6, no next header ... */
		/* VERIFIER: re-bound the offset on every round or it grows without a known maximum. */
		if (off > PM_MAX_L4_OFFSET)
			return PM_RSN_PARSE_ERROR;
		struct ipv6_opt_hdr *ext = data + off;
		if ((void *)(ext + 1) > data_end)
			return PM_RSN_PARSE_ERROR;
		/* AH counts its length in 4-byte units minus 2, the others in 8-byte units minus 1. */
		__u32 len = nexthdr == IPPROTO_AH ? ((__u32)ext->hdrlen + 2) * 4 : ((__u32)ext->hdrlen + 1) * 8;
		nexthdr = ext->nexthdr;
		off += len;
	}
	if (nexthdr == IPPROTO_TCP)
		return pm_parse_tcp(data, data_end, off, pkt);
	return PM_RSN_PARSE_ERROR; /* longer extension chain than we are willing to walk */
}

/* Parse from the Ethernet header. Returns 0 (pkt filled) or an enum pm_reason. */
static __always_inline int pm_parse(void *data, void *data_end, struct pm_pkt *pkt)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return PM_RSN_PARSE_ERROR;
	__u32 off = sizeof(*eth);
	__be16 proto = eth->h_proto;
	if (proto == bpf_htons(PM_ETH_P_8021Q) || proto == bpf_htons(PM_ETH_P_8021AD)) {
		/* One tag: TCI, then the encapsulated EtherType. */
		__be16 *vlan = data + off;
		if ((void *)(vlan + 2) > data_end)
			return PM_RSN_PARSE_ERROR;
		proto = vlan[1];
		off += 4;
	}
	if (proto == bpf_htons(ETH_P_IP))
		return pm_parse_ipv4(data, data_end, off, pkt);
	if (proto == bpf_htons(ETH_P_IPV6))
		return pm_parse_ipv6(data, data_end, off, pkt);
	return PM_RSN_NOT_IP;
}

#endif /* PM_PARSE_H */
