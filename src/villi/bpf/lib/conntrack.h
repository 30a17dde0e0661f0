/* SPDX-License-Identifier: Apache-2.0 */
/* conntrack.h — connection tracking.
 *
 * API:
 *   ct_lookup(p, dir, &entry) → CT_NEW, CT_ESTABLISHED or CT_REPLY. A packet whose
 *     reversed tuple is tracked on the opposite side of the same endpoint is a reply:
 *     replies of allowed connections skip the policy lookup.
 *   ct_create(p, dir, peer_identity, ep_id, cookie, proxy_flags, proxy_port) → 0 or
 *     DROP_CT_CREATE_FAILED; the proxy fields mark connections redirected to the L7
 *     proxy (CT_F_TO_PROXY) and connections the proxy opened (CT_F_PROXY_RETURN).
 *   ct_update(entry, p, is_reply) refreshes the lifetime, counts the packet and
 *     returns 1 when, under the aggregation level, it deserves a flow event.
 * Time is in seconds of bpf_ktime_get_ns(); entries past their lifetime count as
 * absent (the LRU also evicts them under pressure).
 */
#ifndef __VILLI_CONNTRACK_H
#define __VILLI_CONNTRACK_H

#include "common.h"
#include "config.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, CT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_ct SEC(".maps");

#define CT_REPORT_FLAGS (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)

static __always_inline __u32 ct_now(void)
{
	return (__u32)(bpf_ktime_get_ns() / 1000000000ULL);
}

static __always_inline int ct_lookup(const struct pkt *p, __u8 dir, struct ct_value **entry)
{
	__u32 now = ct_now();
	struct ct_key key = {
		.saddr = p->daddr,
		.daddr = p->saddr,
		.sport = p->dport,
		.dport = p->sport,
		.protocol = p->protocol,
		.direction = dir == DIR_INGRESS ? DIR_EGRESS : DIR_INGRESS,
	};
	struct ct_value *v = bpf_map_lookup_elem(&villi_ct, &key);

	if (v && v->expires >= now) {
		*entry = v;
		return CT_REPLY;
	}
	key.saddr = p->saddr;
	key.daddr = p->daddr;
	key.sport = p->sport;
	key.dport = p->dport;
	key.direction = dir;
	v = bpf_map_lookup_elem(&villi_ct, &key);
	if (v && v->expires >= now) {
		/* A SYN on a closing entry opens a new connection over the old tuple. */
		if (v->closing && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
			*entry = NULL;
			return CT_NEW;
		}
		*entry = v;
		return CT_ESTABLISHED;
	}
	*entry = NULL;
	return CT_NEW;
}

static __always_inline __u32 ct_lifetime(const struct pkt *p, __u8 closing, __u8 flags_seen)
{
	if (p->protocol != IPPROTO_TCP)
		return CT_LIFETIME_NONTCP;
	if (closing)
		return CT_LIFETIME_CLOSE;
	if (!(flags_seen & TCP_FLAG_ACK))
		return CT_LIFETIME_SYN;
	return CT_LIFETIME_TCP;
}

static __always_inline int ct_create(const struct pkt *p, __u8 dir, __u32 peer_identity,
				     __u16 ep_id, __u32 cookie, __u8 proxy_flags,
				     __u16 proxy_port)
{
	__u32 now = ct_now();
	struct ct_key key = {
		.saddr = p->saddr,
		.daddr = p->daddr,
		.sport = p->sport,
		.dport = p->dport,
		.protocol = p->protocol,
		.direction = dir,
	};
	struct ct_value v = {
		.packets = 1,
		.bytes = p->len,
		.last_report = now,
		.peer_identity = peer_identity,
		.cookie = cookie,
		.endpoint_id = ep_id,
		.tx_flags_seen = p->tcp_flags,
		.closing = (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) ? 1 : 0,
		.proxy_flags = proxy_flags,
		.proxy_port = proxy_port,
	};
	v.expires = now + ct_lifetime(p, v.closing, v.tx_flags_seen);
	if (bpf_map_update_elem(&villi_ct, &key, &v, BPF_ANY) < 0)
		return DROP_CT_CREATE_FAILED;
	return 0;
}

static __always_inline int ct_update(struct ct_value *v, const struct pkt *p, int is_reply)
{
	__u32 now = ct_now();
	__u8 *seen = is_reply ? &v->rx_flags_seen : &v->tx_flags_seen;
	__u8 new_flags = p->tcp_flags & ~*seen;
	int report = 0;

	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, p->len);
	if (new_flags)
		*seen |= new_flags;
	if (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		v->closing = 1;
	v->expires = now + ct_lifetime(p, v->closing, v->tx_flags_seen | v->rx_flags_seen);

	if (MONITOR_AGGREGATION == AGGREGATION_NONE)
		return 1;
	if (MONITOR_AGGREGATION == AGGREGATION_MAXIMUM)
		return 0;
	if (MONITOR_AGGREGATION == AGGREGATION_LOW && !is_reply)
		report = 1;
	if (new_flags & CT_REPORT_FLAGS)
		report = 1;
	if (now - v->last_report >= CT_REPORT_INTERVAL)
		report = 1;
	if (report)
		v->last_report = now;
	return report;
}

#endif /* __VILLI_CONNTRACK_H */
