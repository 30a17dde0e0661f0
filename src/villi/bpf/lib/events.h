/* SPDX-License-Identifier: Apache-2.0 */
/* events.h — flow events into the ring buffer.
 *
 * API: emit_event(p, ev) copies a filled flow_event into the ring. When the ring is
 * full the event is counted in villi_events_lost (per-CPU) instead of vanishing, so
 * the observer can report lost events.
 */
#ifndef __VILLI_EVENTS_H
#define __VILLI_EVENTS_H

#include "common.h"
#include "config.h"

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENTS_RINGBUF_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_events_lost SEC(".maps");

static __always_inline void emit_event(const struct flow_event *ev)
{
	if (bpf_ringbuf_output(&villi_events, (void *)ev, sizeof(*ev), 0) < 0) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&villi_events_lost, &zero);

		if (lost)
			*lost += 1;
	}
}

#endif /* __VILLI_EVENTS_H */
