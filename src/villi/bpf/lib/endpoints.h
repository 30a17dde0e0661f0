/* SPDX-License-Identifier: Apache-2.0 */
/* endpoints.h — the node's local endpoints.
 *
 * API: endpoint_lookup(addr) returns the local endpoint that owns a pod IPv4, or NULL.
 * One program serves every veth of the node; the entry's ifindex ties an address to
 * its veth, which is how the programs know whose policy applies and reject spoofing.
 */
#ifndef __VILLI_ENDPOINTS_H
#define __VILLI_ENDPOINTS_H

#include "common.h"
#include "config.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_value);
	__uint(max_entries, ENDPOINTS_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_endpoints SEC(".maps");

static __always_inline struct endpoint_value *endpoint_lookup(__u32 addr)
{
	struct endpoint_key key = { .addr = addr };

	return bpf_map_lookup_elem(&villi_endpoints, &key);
}

#endif /* __VILLI_ENDPOINTS_H */
