/* SPDX-License-Identifier: Apache-2.0 */
/*
 * planemesh egress classifier: a direct-action cls_bpf filter on the HTB root qdisc the agent owns on
 * an egress interface. It picks the HTB class from the plane id carried in skb->mark:
 *
 *   plane = skb->mark & PM_MARK_PLANE_MASK  (set at TC ingress for bypassed and intercepted TCP, and by
 *           the proxy's upstream sockets via SO_MARK = PM_MARK_OWN | plane)
 *   plane != 0 -> skb->tc_classid = PM_HTB_PLANE_MINOR_BASE + plane (the minor), TC_ACT_OK
 *   plane == 0 -> TC_ACT_UNSPEC: no verdict, HTB uses its default class
 *
 * In direct-action mode cls_bpf hands HTB classid = TC_H_MAJ(filter classid) | skb->tc_classid.
 * VERIFIER/KERNEL QUIRK: skb->tc_classid is stored in qdisc_skb_cb as a __u16, so a full major:minor
 * written here silently loses its major; the major comes from the filter's own classid, which the
 * loader sets to PM_HTB_MAJOR:0 (ebpf/egress_shaper.py). A class id that does not exist (a plane without
 * a class on this interface) makes HTB fall back to its default class.
 * No maps, no packet parsing: the mark is the whole contract.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>

#include "pm_abi.h"

int pm_tc_egress(struct __sk_buff *skb)
{
	__u32 plane_id = skb->mark & PM_MARK_PLANE_MASK;
	if (!plane_id)
		return TC_ACT_UNSPEC;
	skb->tc_classid = PM_HTB_PLANE_MINOR_BASE + plane_id; /* minor only: see above */
	return TC_ACT_OK;
}
