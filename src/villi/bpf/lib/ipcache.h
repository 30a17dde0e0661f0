/* SPDX-License-Identifier: Apache-2.0 */
/* ipcache.h — IP → security identity.
 *
 * API: ipcache_identity(addr) returns the identity of the longest matching prefix,
 * or ID_WORLD when no prefix covers the address (traffic from outside the cluster).
 */
#ifndef __VILLI_IPCACHE_H
#define __VILLI_IPCACHE_H

#include "common.h"
#include "config.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, IPCACHE_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_ipcache SEC(".maps");

static __always_inline __u32 ipcache_identity(__u32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };
	struct ipcache_value *v = bpf_map_lookup_elem(&villi_ipcache, &key);

	return v ? v->identity : ID_WORLD;
}

#endif /* __VILLI_IPCACHE_H */
