/* SPDX-License-Identifier: Apache-2.0 */
/*
 * PM_MAP: how every planemesh program declares its maps. Built with -DPM_PIN_DIR="\"/sys/fs/bpf/...\"" the
 * maps are pinned there (bcc reuses an already pinned map: a restarted or upgraded agent re-adopts the
 * state); without it nothing is pinned.
 */
#ifndef PM_MAPS_H
#define PM_MAPS_H

#ifdef PM_PIN_DIR
#define PM_MAP(type, key, leaf, name, max, flags) \
	BPF_TABLE_PINNED(type, key, leaf, name, max, PM_PIN_DIR "/" #name, flags)
#else
#define PM_MAP(type, key, leaf, name, max, flags) BPF_F_TABLE(type, key, leaf, name, max, flags)
#endif

#endif /* PM_MAPS_H */
