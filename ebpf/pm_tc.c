/* SPDX-License-Identifier: Apache-2.0 */
/*
 * planemesh TC ingress classifier: one program attached (clsact, direct-action) to every plane
 * interface of the node, sharing its maps.
 *
 *   ifindex -> plane (none: pass) -> own-traffic mark? pass -> parse v4/v6 TCP (anything else: pass)
 *   -> SYN to the node itself at any plane's proxy/sniff port? drop (listeners are reached only by interception)
 *   -> SYN to another plane's address? drop unless this plane may forward there (pm_dests, pm_forward)
 *   -> policy LPM lookup: the source's own rules (plane, dst port, src address, dst prefix), else
 *      (plane, dst port, dst prefix), else the plane's undeclared action
 *   BYPASS: the kernel forwards it as usual
 *   PROXY/SNIFF: established-socket-first: a non-LISTEN socket of the packet's own 4-tuple gets it;
 *     else a SYN goes to the plane's listener; then the "route locally" mark (policy routing table).
 *     Non-SYN without a socket passes (it started before the policy did) unless the plane drops
 *     orphans (HBONE: its proxy died, the rest of its payload must not leave unproxied); no listener
 *     passes unless the plane is fail-closed (drop).
 *
 * Build options (cflags): -DPM_PIN_DIR="\"/sys/fs/bpf/planemesh/x\"" pins every map there (pm_maps.h; bcc reuses
 * an already pinned map, so a restarted agent re-adopts state); without it nothing is pinned.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>

#include "pm_abi.h"
#include "pm_maps.h"
#include "pm_parse.h"

PM_MAP("hash", __u32, struct pm_iface, pm_ifaces, PM_MAX_IFACES, 0);
PM_MAP("array", __u32, struct pm_plane, pm_planes, PM_MAX_PLANES, 0);
PM_MAP("lpm_trie", struct pm_policy_key, struct pm_policy_val, pm_policy, PM_MAX_POLICY, BPF_F_NO_PREALLOC);
PM_MAP("percpu_array", __u32, struct pm_counter, pm_counters, PM_CNT_ENTRIES, 0);
PM_MAP("array", __u32, struct pm_config, pm_config, 1, 0);
PM_MAP("lpm_trie", struct pm_dest_key, struct pm_dest_val, pm_dests, PM_MAX_DESTS, BPF_F_NO_PREALLOC);
PM_MAP("array", __u32, struct pm_forward, pm_forward, PM_MAX_PLANES, 0);
PM_MAP("lpm_trie", struct pm_src_policy_key, struct pm_policy_val, pm_src_policy, PM_MAX_SRC_POLICY,
       BPF_F_NO_PREALLOC);

static __always_inline void pm_count(__u32 plane_id, __u32 slot, __u32 len)
{
	__u32 idx = (plane_id & (PM_MAX_PLANES - 1)) * PM_CNT_SLOTS + (slot & (PM_CNT_SLOTS - 1));
	struct pm_counter *c = pm_counters.lookup(&idx);
	if (c) { /* per-CPU slot: no atomics needed */
		c->packets += 1;
		c->bytes += len;
	}
}

/* The packet's source's own rule (a local workload's outbound configuration), if the source has one. */
static __always_inline struct pm_policy_val *pm_src_policy_lookup(__u32 plane_id, const struct pm_pkt *pkt)
{
	struct pm_src_policy_key key = {};
	key.prefixlen = PM_SRC_POLICY_DADDR_OFFSET_BITS + (pkt->family == PM_FAMILY_V4 ? 32 : 128);
	key.plane_id = bpf_htons((__u16)plane_id);
	key.dst_port = pkt->dport;
	key.family = pkt->family;
	__builtin_memcpy(key.saddr, pkt->saddr, 16);
	__builtin_memcpy(key.daddr, pkt->daddr, 16);
	return pm_src_policy.lookup(&key);
}

static __always_inline __u32 pm_policy_action(__u32 plane_id, const struct pm_pkt *pkt, const struct pm_plane *plane,
					      const struct pm_config *cfg)
{
	if (cfg->flags & PM_CFG_F_SRC_POLICY) {
		struct pm_policy_val *own = pm_src_policy_lookup(plane_id, pkt);
		if (own)
			return own->action;
	}
	struct pm_policy_key key = {};
	key.prefixlen = PM_POLICY_ADDR_OFFSET_BITS + (pkt->family == PM_FAMILY_V4 ? 32 : 128);
	key.plane_id = bpf_htons((__u16)plane_id);
	key.dst_port = pkt->dport;
	key.family = pkt->family;
	__builtin_memcpy(key.addr, pkt->daddr, 16);
	struct pm_policy_val *val = pm_policy.lookup(&key);
	return val ? val->action : plane->undeclared_action;
}

/* Cross-plane policy for a new connection: 0 = same plane, no plane, or allowed (counted CROSS_PLANE);
 * otherwise PM_RSN_CROSS_PLANE_DROP. */
static __always_inline __u32 pm_cross_plane(__u32 plane_id, const struct pm_pkt *pkt, __u32 len)
{
	struct pm_dest_key key = {};
	key.prefixlen = PM_DEST_ADDR_OFFSET_BITS + (pkt->family == PM_FAMILY_V4 ? 32 : 128);
	key.family = pkt->family;
	__builtin_memcpy(key.addr, pkt->daddr, 16);
	struct pm_dest_val *dest = pm_dests.lookup(&key);
	if (!dest || dest->plane_id == plane_id)
		return 0;
	__u32 dst_plane = dest->plane_id;
	struct pm_forward *fwd = pm_forward.lookup(&plane_id);
	if (!fwd || dst_plane >= PM_MAX_PLANES || !(fwd->planes & (1ULL << dst_plane)))
		return PM_RSN_CROSS_PLANE_DROP;
	pm_count(plane_id, PM_RSN_CROSS_PLANE, len);
	return 0;
}

/* Is `dport` (network order) the proxy or sniff port of any active plane? A bounded walk of pm_planes (array
 * lookups the verifier inlines), done for SYNs only, so the listener set never needs a map of its own. */
static __always_inline int pm_listener_port(__be16 dport)
{
	__u16 port = bpf_ntohs(dport);
	for (__u32 id = 1; id < PM_MAX_PLANES; id++) {
		struct pm_plane *p = pm_planes.lookup(&id);
		if (p && (p->flags & PM_PLANE_F_ACTIVE) && (p->proxy_port == port || p->sniff_port == port))
			return 1;
	}
	return 0;
}

/* Would the kernel deliver this packet locally (a node address) rather than forward it? The FIB says so with
 * NOT_FWDED (a local, broadcast or unroutable destination); with forwarding disabled on the interface nothing
 * is forwarded, so whatever the kernel accepts is local too. A forwarded destination (even one whose route
 * refuses it: blackhole, unreachable, prohibit) is transit: a SYN to remote:15001 is intercepted as usual. */
static __always_inline int pm_node_local(struct __sk_buff *skb, const struct pm_pkt *pkt)
{
	struct bpf_fib_lookup fib = {};
	fib.ifindex = skb->ifindex;
	fib.l4_protocol = IPPROTO_TCP;
	fib.sport = pkt->sport;
	fib.dport = pkt->dport;
	if (pkt->family == PM_FAMILY_V4) {
		fib.family = 2; /* AF_INET */
		__builtin_memcpy(&fib.ipv4_src, pkt->saddr, 4);
		__builtin_memcpy(&fib.ipv4_dst, pkt->daddr, 4);
	} else {
		fib.family = 10; /* AF_INET6 */
		__builtin_memcpy(fib.ipv6_src, pkt->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, pkt->daddr, 16);
	}
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	return rc == BPF_FIB_LKUP_RET_NOT_FWDED || rc == BPF_FIB_LKUP_RET_FWD_DISABLED;
}

/* Fill a bpf_sock_tuple; returns its size for bpf_skc_lookup_tcp. */
static __always_inline __u32 pm_tuple(struct bpf_sock_tuple *t, const struct pm_pkt *pkt, const __u8 *daddr,
				      __be16 dport)
{
	if (pkt->family == PM_FAMILY_V4) {
		__builtin_memcpy(&t->ipv4.saddr, pkt->saddr, 4);
		__builtin_memcpy(&t->ipv4.daddr, daddr, 4);
		t->ipv4.sport = pkt->sport;
		t->ipv4.dport = dport;
		return sizeof(t->ipv4);
	}
	__builtin_memcpy(t->ipv6.saddr, pkt->saddr, 16);
	__builtin_memcpy(t->ipv6.daddr, daddr, 16);
	t->ipv6.sport = pkt->sport;
	t->ipv6.dport = dport;
	return sizeof(t->ipv6);
}

/* Hand the packet to a socket and route it locally. Returns the outcome slot. */
static __always_inline __u32 pm_assign(struct __sk_buff *skb, struct bpf_sock *sk, const struct pm_config *cfg,
				       __u32 plane_id, __u32 slot)
{
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return PM_RSN_ASSIGN_FAILED;
	__u32 mark = skb->mark & ~(cfg->local_mask | cfg->plane_mask);
	skb->mark = mark | (cfg->local_mark & cfg->local_mask) | (plane_id & cfg->plane_mask);
	return slot;
}

/* PROXY/SNIFF: established socket first, then (SYN only) the listener. Returns the outcome slot. */
static __always_inline __u32 pm_intercept(struct __sk_buff *skb, const struct pm_pkt *pkt,
					  const struct pm_config *cfg, const struct pm_plane *plane, __u32 plane_id,
					  __u16 listen_port)
{
	struct bpf_sock_tuple tuple = {};
	__u32 size = pm_tuple(&tuple, pkt, pkt->daddr, pkt->dport);
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, size, BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN)
			return pm_assign(skb, sk, cfg, plane_id, PM_RSN_ESTABLISHED);
		bpf_sk_release(sk); /* a listener on the original address itself: not ours */
	}
	if (!pkt->syn)
		return PM_RSN_NO_SOCKET; /* began before the policy: finishes on its old path */

	/* The plane's dual-stack [::]:port listener, found via the loopback address of the family. */
	__u8 loopback[16] = {};
	if (pkt->family == PM_FAMILY_V4) {
		loopback[0] = 127;
		loopback[3] = 1;
	} else {
		loopback[15] = 1;
	}
	struct bpf_sock_tuple ltuple = {};
	size = pm_tuple(&ltuple, pkt, loopback, bpf_htons(listen_port));
	sk = listen_port ? bpf_skc_lookup_tcp(skb, &ltuple, size, BPF_F_CURRENT_NETNS, 0) : 0;
	if (!sk)
		return PM_RSN_NO_LISTENER;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return PM_RSN_NO_LISTENER;
	}
	return pm_assign(skb, sk, cfg, plane_id, PM_RSN_LISTENER);
}

int pm_tc_ingress(struct __sk_buff *skb)
{
	__u32 len = skb->len;
	__u32 ifindex = skb->ifindex;
	struct pm_iface *iface = pm_ifaces.lookup(&ifindex);
	if (!iface || iface->plane_id == 0 || iface->plane_id >= PM_MAX_PLANES) {
		pm_count(0, PM_RSN_NO_PLANE, len);
		return TC_ACT_OK;
	}
	__u32 plane_id = iface->plane_id;

	__u32 zero = 0;
	struct pm_config *cfg = pm_config.lookup(&zero);
	struct pm_plane *plane = pm_planes.lookup(&plane_id);
	if (!cfg || cfg->abi_version != PM_ABI_VERSION || !plane || !(plane->flags & PM_PLANE_F_ACTIVE)) {
		pm_count(plane_id, PM_RSN_UNCONFIGURED, len);
		return TC_ACT_OK;
	}
	if (cfg->own_mask && (skb->mark & cfg->own_mask) == cfg->own_mark) {
		pm_count(plane_id, PM_RSN_OWN_TRAFFIC, len);
		return TC_ACT_OK;
	}

	/* Pointers are derived here, after the map lookups; nothing below moves packet data. */
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct pm_pkt pkt = {};
	int reason = pm_parse(data, data_end, &pkt);
	if (reason) {
		pm_count(plane_id, reason, len);
		return TC_ACT_OK;
	}

	/* The planes' listeners take connections only through interception (sk_assign keeps the original
	 * destination port). A SYN addressed to the node itself at a proxy/sniff port would reach a listener
	 * directly, possibly another plane's (an oam pod filling media's connection budget): refused. */
	if (pkt.syn && pm_listener_port(pkt.dport) && pm_node_local(skb, &pkt)) {
		pm_count(plane_id, PM_RSN_LISTENER_PORT_DROP, len);
		return TC_ACT_SHOT;
	}

	/* Only new connections are checked: replies and established flows cost nothing more, and a segment
	 * of a connection that never opened is refused by its destination anyway. Before the port's action,
	 * so bypassed TCP stays on its plane too. */
	if (pkt.syn && pm_cross_plane(plane_id, &pkt, len)) {
		pm_count(plane_id, PM_RSN_CROSS_PLANE_DROP, len);
		return TC_ACT_SHOT;
	}

	__u32 action = pm_policy_action(plane_id, &pkt, plane, cfg);
	if (action != PM_ACT_PROXY && action != PM_ACT_SNIFF) {
		if (action == PM_ACT_DROP) {
			pm_count(plane_id, PM_ACT_DROP, len);
			return TC_ACT_SHOT;
		}
		pm_count(plane_id, action == PM_ACT_BYPASS ? PM_ACT_BYPASS : PM_ACT_NONE, len);
		if (action == PM_ACT_BYPASS && cfg->plane_mask)
			skb->mark = (skb->mark & ~cfg->plane_mask) | (plane_id & cfg->plane_mask);
		return TC_ACT_OK;
	}
	pm_count(plane_id, action, len);

	__u16 port = action == PM_ACT_PROXY ? plane->proxy_port : plane->sniff_port;
	__u32 outcome = pm_intercept(skb, &pkt, cfg, plane, plane_id, port);
	if ((outcome == PM_RSN_NO_LISTENER && (plane->flags & PM_PLANE_F_FAIL_CLOSED)) ||
	    (outcome == PM_RSN_NO_SOCKET && (plane->flags & PM_PLANE_F_NO_ORPHANS))) {
		pm_count(plane_id, PM_ACT_DROP, len);
		return TC_ACT_SHOT;
	}
	pm_count(plane_id, outcome, len);
	return TC_ACT_OK;
}
