/* SPDX-License-Identifier: Apache-2.0 */
/*
 * planemesh data-path ABI: every constant, struct and map key/value that the BPF program and the
 * Python agent (planemesh.ebpf.abi, a ctypes mirror) share. This header is the single definition;
 * tests/bpf/test_ebpf_abi.py compares the mirror's sizes, offsets and enum values with what bcc
 * compiled, so a drift fails CI instead of corrupting maps.
 *
 * Rules: fixed-width types only, explicit padding (no implicit holes), byte order stated per field.
 * Enum values are a contract: never renumber or reuse a value; add new ones at the end and bump
 * PM_ABI_VERSION when a struct layout changes.
 */
#ifndef PM_ABI_H
#define PM_ABI_H

#include <linux/types.h>

#define PM_ABI_VERSION 1

/* Plane ids 1..63; 0 means "not a plane interface". Mirrors planemesh.model.planes.MAX_PLANES. */
#define PM_MAX_PLANES 64
#define PM_MAX_IFACES 4096
#define PM_MAX_POLICY 65536
#define PM_MAX_DESTS 16384 /* plane CIDRs of the node (pm_dests) */
#define PM_MAX_SRC_POLICY 131072 /* per-source rules (pm_src_policy): workloads x their rules */

/* ---- verdicts: what the policy says about a (plane, port[, prefix]) --------------------------- */
enum pm_action {
	PM_ACT_NONE = 0,   /* no decision (unparsed, not a plane, ...): the packet passes untouched */
	PM_ACT_BYPASS = 1, /* plain L4: the kernel forwards it as usual */
	PM_ACT_PROXY = 2,  /* HTTP: assign to the plane's transparent L7 listener (proxy_port) */
	PM_ACT_SNIFF = 3,  /* unknown: assign to the plane's sniffing listener (sniff_port) */
	PM_ACT_DROP = 4,   /* dropped (fail-closed plane without a listener) */
};

/* ---- counter slots: per plane, one slot per action above plus these reasons ------------------
 * Every packet of a known plane is counted once in a *decision* slot: BYPASS/PROXY/SNIFF, or one of
 * NOT_IP/NOT_TCP/FRAGMENT/PARSE_ERROR/OWN_TRAFFIC/UNCONFIGURED/CROSS_PLANE_DROP/LISTENER_PORT_DROP. Packets the policy sent
 * to a listener (PROXY or SNIFF) are counted a second time in an *outcome* slot: ESTABLISHED, LISTENER,
 * NO_SOCKET, NO_LISTENER, ASSIGN_FAILED or DROP. A SYN to another plane's address that the plane may
 * forward to is also counted in CROSS_PLANE. Packets of interfaces that are not planes count as plane 0,
 * slot NO_PLANE.
 */
enum pm_reason {
	PM_RSN_NOT_IP = 5,        /* not IPv4/IPv6 (ARP, LLDP, ...) */
	PM_RSN_NOT_TCP = 6,       /* IP but not TCP (UDP, ICMP, SCTP ...) */
	PM_RSN_FRAGMENT = 7,      /* an IP fragment: ports unknown (or unreliable), passes */
	PM_RSN_PARSE_ERROR = 8,   /* truncated or malformed headers: passes untouched */
	PM_RSN_OWN_TRAFFIC = 9,   /* carries the own-traffic mark (the proxy's upstream): passes */
	PM_RSN_NO_LISTENER = 10,  /* SYN to PROXY/SNIFF but the plane's listener is gone */
	PM_RSN_ESTABLISHED = 11,  /* assigned to an existing (non-listening) socket of its 4-tuple */
	PM_RSN_LISTENER = 12,     /* SYN assigned to the plane's listener */
	PM_RSN_NO_SOCKET = 13,    /* non-SYN without a socket: a pre-policy connection, passes */
	PM_RSN_ASSIGN_FAILED = 14,/* bpf_sk_assign refused (e.g. BPF_PROG_TEST_RUN, other netns) */
	PM_RSN_NO_PLANE = 15,     /* ingress interface is not a plane (counted as plane 0) */
	PM_RSN_UNCONFIGURED = 16, /* the config map holds no valid ABI version yet: passes */
	PM_RSN_CROSS_PLANE_DROP = 17, /* SYN to another plane's address, not in pm_forward: dropped */
	PM_RSN_CROSS_PLANE = 18,      /* SYN to another plane's address that pm_forward allows (extra count) */
	PM_RSN_LISTENER_PORT_DROP = 19, /* SYN to the node itself at a plane's proxy/sniff port: dropped */
};
#define PM_CNT_SLOTS 32 /* counter slots per plane: counter index = plane_id * PM_CNT_SLOTS + slot */
#define PM_CNT_ENTRIES (PM_MAX_PLANES * PM_CNT_SLOTS)

/* ---- skb->mark layout (marks never leave the node's network namespace) ------------------------
 * PM_MARK_PLANE_MASK: the plane id, set on every TCP packet of a plane (per-plane HTB later).
 * PM_MARK_LOCAL: "route locally to the proxy"; the policy rule `fwmark LOCAL/LOCAL lookup T` matches
 *   it and table T holds `local default dev lo`.
 * PM_MARK_OWN: the proxy's own upstream traffic (SO_MARK); the program passes it untouched.
 * The values the program uses come from the config map (struct pm_config); these are the defaults.
 */
#define PM_MARK_PLANE_MASK 0x0000003fu
#define PM_MARK_LOCAL 0x00400000u
#define PM_MARK_OWN 0x00800000u

/* ---- map: pm_ifaces, ifindex (host order, __u32) -> struct pm_iface --------------------------- */
#define PM_IF_F_CLSACT_OURS 0x1u /* the agent created this interface's clsact qdisc */
#define PM_IF_F_ATTACHED 0x2u    /* the agent attached the program to this interface */
struct pm_iface {
	__u32 plane_id; /* host order; 0 = attached but not (yet) a plane: packets pass */
	__u32 flags;    /* host order; PM_IF_F_* (bookkeeping for detach, survives agent restarts) */
};

/* ---- map: pm_planes, array indexed by plane_id -> struct pm_plane ---------------------------- */
#define PM_PLANE_F_FAIL_CLOSED 0x1u /* no listener for a new connection: drop instead of pass */
#define PM_PLANE_F_ACTIVE 0x2u      /* this slot holds a configured plane */
#define PM_PLANE_F_NO_ORPHANS 0x4u  /* a non-SYN of an intercepted flow without its socket: drop, not pass */
struct pm_plane {
	__u16 proxy_port;        /* host order: the plane's transparent L7 listener */
	__u16 sniff_port;        /* host order: the plane's sniffing listener */
	__u32 undeclared_action; /* host order; enum pm_action for ports without a policy entry */
	__u32 flags;             /* host order; PM_PLANE_F_* */
	__u32 pad;               /* zero */
};

/* ---- map: pm_policy, LPM trie struct pm_policy_key -> struct pm_policy_val ---------------------
 * Match data after prefixlen: plane_id (16 bits), dst_port (16), family (8), pad (24), addr (128).
 * A (plane, port) rule has prefixlen 32 and so matches both families; a (plane, port, prefix) rule
 * has prefixlen 64 + prefix length (v4 addresses occupy addr[0..3]). Longest prefix wins.
 */
#define PM_POLICY_PORT_BITS 32
#define PM_POLICY_ADDR_OFFSET_BITS 64
#define PM_FAMILY_V4 4
#define PM_FAMILY_V6 6
struct pm_policy_key {
	__u32 prefixlen;  /* host order: significant bits after this field */
	__be16 plane_id;  /* NETWORK order (the trie compares bytes left to right) */
	__be16 dst_port;  /* NETWORK order */
	__u8 family;      /* PM_FAMILY_V4 / PM_FAMILY_V6 */
	__u8 pad[3];      /* zero */
	__u8 addr[16];    /* NETWORK order; IPv4 in addr[0..3], the rest zero */
};
struct pm_policy_val {
	__u32 action; /* host order; enum pm_action */
	__u32 flags;  /* host order; reserved, zero */
};

/* ---- map: pm_src_policy, LPM trie struct pm_src_policy_key -> struct pm_policy_val -------------
 * Per-source policy: one node agent serving many workloads, each with its own outbound configuration (its
 * sidecar's). Match data after prefixlen: plane_id (16), dst_port (16), family (8), pad (24), saddr (128),
 * daddr (128). The source is always a whole address: prefixlen is PM_SRC_POLICY_DADDR_OFFSET_BITS (any
 * destination of the source's family) + the destination prefix length (v4 addresses in [0..3]). Looked up
 * before pm_policy when pm_config.flags has PM_CFG_F_SRC_POLICY; a hit decides (the agent folds the
 * node-wide rules of the same plane and port into each source's set, so the longest destination wins).
 */
#define PM_SRC_POLICY_DADDR_OFFSET_BITS 192
struct pm_src_policy_key {
	__u32 prefixlen;  /* host order: significant bits after this field */
	__be16 plane_id;  /* NETWORK order */
	__be16 dst_port;  /* NETWORK order */
	__u8 family;      /* PM_FAMILY_V4 / PM_FAMILY_V6 */
	__u8 pad[3];      /* zero */
	__u8 saddr[16];   /* NETWORK order; IPv4 in saddr[0..3], the rest zero */
	__u8 daddr[16];   /* NETWORK order; IPv4 in daddr[0..3], the rest zero */
};

/* ---- map: pm_counters, per-CPU array indexed by plane_id * PM_CNT_SLOTS + slot ------------------ */
struct pm_counter {
	__u64 packets; /* host order */
	__u64 bytes;   /* host order: skb->len at TC ingress (L2 header included) */
};

/* ---- map: pm_config, array of one struct pm_config ------------------------------------------ */
#define PM_CFG_F_SRC_POLICY 0x1u /* pm_src_policy holds rules: look it up first (else skip the lookup) */
struct pm_config {
	__u32 abi_version; /* host order: PM_ABI_VERSION, written by the loader; 0 = unconfigured */
	__u32 local_mark;  /* host order: bits set to route a packet to the local proxy */
	__u32 local_mask;  /* host order: the bits local_mark lives in */
	__u32 own_mark;    /* host order: the proxy's upstream traffic carries own_mark under own_mask */
	__u32 own_mask;    /* host order */
	__u32 plane_mask;  /* host order: where the plane id goes in skb->mark (0: don't mark planes) */
	__u32 flags;       /* host order; PM_CFG_F_* */
	__u32 pad;         /* zero */
};

/* ---- map: pm_dests, LPM trie struct pm_dest_key -> struct pm_dest_val: the plane of a destination
 * (every plane CIDR of the node). Match data after prefixlen: family (8), pad (24), addr (128);
 * prefixlen = 32 + network length. Host mode's pm_host_dest has the same layout.
 */
#define PM_DEST_ADDR_OFFSET_BITS 32
struct pm_dest_key {
	__u32 prefixlen; /* host order */
	__u8 family;     /* PM_FAMILY_V4 / PM_FAMILY_V6 */
	__u8 pad[3];     /* zero */
	__u8 addr[16];   /* NETWORK order; IPv4 in addr[0..3] */
};
struct pm_dest_val {
	__u32 plane_id; /* host order */
	__u32 flags;    /* host order; reserved, zero */
};

/* ---- map: pm_forward, array indexed by plane_id -> struct pm_forward ----------------------------
 * Cross-plane policy: a SYN arriving on plane A whose destination lies in plane B's CIDRs (pm_dests) is
 * dropped unless bit B of A's entry is set (the plane's `forward_to`), whatever the port's action.
 */
struct pm_forward {
	__u64 planes; /* host order: bit P set = may open connections to plane P's addresses */
};

/* ---- egress shaping (pm_egress.c on an HTB root qdisc; planemesh.netplanes.htb_plan) ----------
 * The HTB qdisc we own has handle PM_HTB_MAJOR:0; its root class is PM_HTB_MAJOR:PM_HTB_ROOT_MINOR,
 * plane P's class is PM_HTB_MAJOR:(PM_HTB_PLANE_MINOR_BASE + P), unmarked traffic goes to the default
 * class PM_HTB_MAJOR:PM_HTB_DEFAULT_MINOR. The classifier sets skb->tc_classid from the plane bits of
 * skb->mark (PM_MARK_PLANE_MASK); a class that does not exist falls back to the default class.
 */
#define PM_HTB_MAJOR 0x504d
#define PM_HTB_ROOT_MINOR 0x1
#define PM_HTB_PLANE_MINOR_BASE 0x100
#define PM_HTB_DEFAULT_MINOR 0xffff

/* ---- host mode (pm_host.c: cgroup connect4/connect6 + sock_ops) --------------------------------
 * map pm_host_dest: LPM trie struct pm_dest_key -> struct pm_dest_val, the plane of a destination.
 * Policy and plane settings reuse struct pm_policy_key/val and struct pm_plane (maps pm_host_policy,
 * pm_host_planes), with the same meaning as for the TC program.
 */
#define PM_HOST_MAX_DEST 16384
#define PM_HOST_MAX_CONNS 65536
/* The original destination of a redirected connect (value of pm_host_by_cookie / pm_host_by_peer). */
struct pm_host_orig {
	__u8 family;   /* PM_FAMILY_V4 / PM_FAMILY_V6 */
	__u8 pad;      /* zero */
	__be16 port;   /* NETWORK order */
	__u32 plane_id;/* host order */
	__u8 addr[16]; /* NETWORK order; IPv4 in addr[0..3] */
};
/* Key of pm_host_by_peer: the redirected socket's local (source) address as the proxy sees its peer. */
struct pm_host_peer {
	__u8 family;   /* PM_FAMILY_V4 / PM_FAMILY_V6 */
	__u8 pad;      /* zero */
	__u16 port;    /* HOST order (sock_ops local_port is host order) */
	__u8 addr[16]; /* NETWORK order; IPv4 in addr[0..3] */
};

#endif /* PM_ABI_H */
