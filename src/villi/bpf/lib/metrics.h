/* SPDX-License-Identifier: Apache-2.0 */
/* metrics.h — per-CPU packet and byte counters by (reason, direction).
 *
 * API: metrics_count(reason, direction, bytes). A per-CPU array rather than a hash:
 * the key space is small and fixed (256 reasons × 2 directions), so an array slot
 * costs no hashing and no allocation on the hot path.
 */
#ifndef __VILLI_METRICS_H
#define __VILLI_METRICS_H

#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(max_entries, METRICS_SLOTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_metrics SEC(".maps");

static __always_inline void metrics_count(__u8 reason, __u8 direction, __u32 bytes)
{
	__u32 slot = ((__u32)reason << 1) | (direction & 1);
	struct metrics_value *m = bpf_map_lookup_elem(&villi_metrics, &slot);

	if (m) {
		m->packets += 1;
		m->bytes += bytes;
	}
}

#endif /* __VILLI_METRICS_H */
