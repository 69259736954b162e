/* SPDX-License-Identifier: Apache-2.0 */
/*
 * planemesh host mode: applications running directly on the node (no pod, no plane interface to
 * intercept on) are redirected at connect() time, in the cgroup v2 they run in.
 *
 *   connect4 / connect6 (BPF_PROG_TYPE_CGROUP_SOCK_ADDR): TCP only; sockets carrying the own mark
 *     (the proxy's upstream) are left alone. destination -> plane (pm_host_dest, LPM on the plane
 *     CIDRs) -> action (pm_host_policy (plane, port[, prefix]), else the plane's undeclared action).
 *     PROXY/SNIFF: remember the original destination by socket cookie (pm_host_by_cookie) and rewrite
 *     the destination to the plane's listener on loopback (127.0.0.1, ::1, or ::ffff:127.0.0.1 for a
 *     v4-mapped destination of a v6 socket).
 *     Fail open: only if the plane's listener is there (a LISTEN socket on that loopback port in the
 *     connecting socket's network namespace); with no listener (agent gone, plane being restarted,
 *     a process in another netns) the connect goes to its original destination untouched.
 *   sock_ops at TCP_CONNECT_CB: the local port is known now; move the entry to pm_host_by_peer keyed
 *     by the socket's (family, local address, local port) -- what the proxy sees as the peer after
 *     accept() -- where planemesh.ebpf.host_redirect looks it up.
 *
 * Build options: -DPM_HOST_OWN_MARK=<mask> (default PM_MARK_OWN); -DPM_PIN_DIR="\"/sys/fs/bpf/...\""
 * pins every map there (bcc reuses a pinned map: an agent taking over from another shares its maps, so
 * a connect redirected by either agent's programs is found by either agent's workers).
 */
#define SOCK_STREAM 1 /* bcc compiles without libc headers: the one socket constant we need */
#define PM_AF_INET 2
#define PM_AF_INET6 10
#define PM_IPPROTO_TCP 6
#include <linux/bpf.h>

#include "pm_abi.h"
#include "pm_maps.h"

#ifndef PM_HOST_OWN_MARK
#define PM_HOST_OWN_MARK PM_MARK_OWN
#endif

PM_MAP("lpm_trie", struct pm_dest_key, struct pm_dest_val, pm_host_dest, PM_HOST_MAX_DEST, BPF_F_NO_PREALLOC);
PM_MAP("lpm_trie", struct pm_policy_key, struct pm_policy_val, pm_host_policy, PM_MAX_POLICY, BPF_F_NO_PREALLOC);
PM_MAP("array", __u32, struct pm_plane, pm_host_planes, PM_MAX_PLANES, 0);
/* LRU: entries of connections that never reach the proxy (refused, aborted) age out by themselves. */
PM_MAP("lru_hash", __u64, struct pm_host_orig, pm_host_by_cookie, PM_HOST_MAX_CONNS, 0);
PM_MAP("lru_hash", struct pm_host_peer, struct pm_host_orig, pm_host_by_peer, PM_HOST_MAX_CONNS, 0);

/* The listener port for (family, addr, port) if it is to be redirected, else 0; fills *orig. */
static __always_inline __u16 pm_host_target(__u8 family, const __u8 *addr, __u32 dport_be, struct pm_host_orig *orig)
{
	struct pm_dest_key dk = {};
	dk.prefixlen = PM_DEST_ADDR_OFFSET_BITS + (family == PM_FAMILY_V4 ? 32 : 128);
	dk.family = family;
	__builtin_memcpy(dk.addr, addr, 16);
	struct pm_dest_val *dv = pm_host_dest.lookup(&dk);
	if (!dv)
		return 0;
	__u32 plane_id = dv->plane_id;
	if (plane_id == 0 || plane_id >= PM_MAX_PLANES)
		return 0;
	struct pm_plane *plane = pm_host_planes.lookup(&plane_id);
	if (!plane || !(plane->flags & PM_PLANE_F_ACTIVE))
		return 0;

	struct pm_policy_key pk = {};
	pk.prefixlen = PM_POLICY_ADDR_OFFSET_BITS + (family == PM_FAMILY_V4 ? 32 : 128);
	pk.plane_id = bpf_htons((__u16)plane_id);
	pk.dst_port = (__be16)dport_be;
	pk.family = family;
	__builtin_memcpy(pk.addr, addr, 16);
	struct pm_policy_val *pv = pm_host_policy.lookup(&pk);
	__u32 action = pv ? pv->action : plane->undeclared_action;
	__u16 port = action == PM_ACT_PROXY ? plane->proxy_port : action == PM_ACT_SNIFF ? plane->sniff_port : 0;
	if (!port)
		return 0;
	orig->family = family;
	orig->port = (__be16)dport_be;
	orig->plane_id = plane_id;
	__builtin_memcpy(orig->addr, addr, 16);
	return port;
}

/* Is the plane's listener there? A LISTEN socket on loopback:port (127.0.0.1 finds the dual-stack [::]
 * listener too) in the connecting socket's own network namespace. */
static __always_inline int pm_host_listening(struct bpf_sock_addr *ctx, int v4, __u16 port)
{
	struct bpf_sock_tuple t = {};
	__u32 size;
	if (v4) {
		t.ipv4.daddr = bpf_htonl(0x7f000001);
		t.ipv4.dport = bpf_htons(port);
		size = sizeof(t.ipv4);
	} else {
		t.ipv6.daddr[3] = bpf_htonl(1);
		t.ipv6.dport = bpf_htons(port);
		size = sizeof(t.ipv6);
	}
	struct bpf_sock *sk = bpf_sk_lookup_tcp(ctx, &t, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	int listening = sk->state == BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return listening;
}

static __always_inline int pm_host_skip(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != PM_IPPROTO_TCP)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	return sk && (sk->mark & PM_HOST_OWN_MARK) == PM_HOST_OWN_MARK;
}

static __always_inline void pm_host_remember(struct bpf_sock_addr *ctx, struct pm_host_orig *orig)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	pm_host_by_cookie.update(&cookie, orig);
}

int pm_connect4(struct bpf_sock_addr *ctx)
{
	if (pm_host_skip(ctx))
		return 1;
	__u8 addr[16] = {};
	__u32 ip = ctx->user_ip4;
	__builtin_memcpy(addr, &ip, 4);
	struct pm_host_orig orig = {};
	__u16 port = pm_host_target(PM_FAMILY_V4, addr, ctx->user_port, &orig);
	if (!port || !pm_host_listening(ctx, 1, port))
		return 1;
	pm_host_remember(ctx, &orig);
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(port);
	return 1;
}

int pm_connect6(struct bpf_sock_addr *ctx)
{
	if (pm_host_skip(ctx))
		return 1;
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
	__u8 addr[16] = {};
	struct pm_host_orig orig = {};
	__u16 port;
	if (w0 == 0 && w1 == 0 && w2 == bpf_htonl(0xffff)) { /* v4-mapped: a v4 destination */
		__builtin_memcpy(addr, &w3, 4);
		port = pm_host_target(PM_FAMILY_V4, addr, ctx->user_port, &orig);
		if (!port || !pm_host_listening(ctx, 1, port))
			return 1;
		pm_host_remember(ctx, &orig);
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		__builtin_memcpy(addr, &w0, 4);
		__builtin_memcpy(addr + 4, &w1, 4);
		__builtin_memcpy(addr + 8, &w2, 4);
		__builtin_memcpy(addr + 12, &w3, 4);
		port = pm_host_target(PM_FAMILY_V6, addr, ctx->user_port, &orig);
		if (!port || !pm_host_listening(ctx, 0, port))
			return 1;
		pm_host_remember(ctx, &orig);
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(port);
	return 1;
}

int pm_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct pm_host_orig *orig = pm_host_by_cookie.lookup(&cookie);
	if (!orig)
		return 1;
	struct pm_host_orig copy = *orig;
	struct pm_host_peer key = {};
	key.port = (__u16)skops->local_port; /* host order */
	if (skops->family == PM_AF_INET) {
		__u32 ip = skops->local_ip4;
		key.family = PM_FAMILY_V4;
		__builtin_memcpy(key.addr, &ip, 4);
	} else {
		__u32 w0 = skops->local_ip6[0], w1 = skops->local_ip6[1], w2 = skops->local_ip6[2];
		__u32 w3 = skops->local_ip6[3];
		if (w0 == 0 && w1 == 0 && w2 == bpf_htonl(0xffff)) { /* the proxy sees it as IPv4 too */
			key.family = PM_FAMILY_V4;
			__builtin_memcpy(key.addr, &w3, 4);
		} else {
			key.family = PM_FAMILY_V6;
			__builtin_memcpy(key.addr, &w0, 4);
			__builtin_memcpy(key.addr + 4, &w1, 4);
			__builtin_memcpy(key.addr + 8, &w2, 4);
			__builtin_memcpy(key.addr + 12, &w3, 4);
		}
	}
	pm_host_by_peer.update(&key, &copy);
	pm_host_by_cookie.delete(&cookie);
	return 1;
}
