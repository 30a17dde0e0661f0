/* SPDX-License-Identifier: Apache-2.0 */
/* lb.h — ClusterIP load balancing at the socket layer.
 *
 * API:
 *   lb4_xlate_fwd(ctx)  connect4/sendmsg4: when ctx's destination is a service
 *                       frontend, pick a backend and rewrite the destination to it;
 *                       returns LB_PASS (1) or LB_REFUSE (0, retval -ECONNREFUSED set)
 *                       when the service has no backend.
 *   lb4_xlate_rev(ctx)  recvmsg4/getpeername4: when ctx's address is a backend this
 *                       socket was translated to, rewrite it back to the VIP.
 *
 * Maps (pinned by name, so the agent and every loaded copy share them):
 *   villi_lb_services   {VIP, port, proto, slot} → frontend (slot 0) or backend id
 *   villi_lb_backends   backend id → backend address and port
 *   villi_lb_revnat     LRU {socket cookie, backend} → VIP (reverse translation)
 *   villi_lb_affinity   LRU {client netns cookie, service id} → backend, last use
 *
 * Each connect costs a fixed number of hash lookups (frontend, slot, backend, plus
 * the affinity entry when asked): independent of how many services exist.
 *
 * Backend selection is random (bpf_get_prandom_u32() for TCP, a hash of the socket
 * cookie for UDP so that an unconnected socket keeps talking to one backend), not
 * Maglev: the choice is made once per socket, on the client's own node, and the
 * socket itself remembers it, so no other node ever has to reproduce the decision —
 * which is what Maglev's consistent hashing buys, at the price of a lookup table per
 * service (M entries, rebuilt on every backend change). See docs/services.md.
 */
#ifndef __VILLI_LB_H
#define __VILLI_LB_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
#include "config.h"
#include "events.h"
#include "metrics.h"

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif

#ifndef LB_SERVICES_MAP_SIZE
#define LB_SERVICES_MAP_SIZE 131072     /* frontends + backend slots */
#endif
#ifndef LB_BACKENDS_MAP_SIZE
#define LB_BACKENDS_MAP_SIZE 131072
#endif
#ifndef LB_REVNAT_MAP_SIZE
#define LB_REVNAT_MAP_SIZE 262144
#endif
#ifndef LB_AFFINITY_MAP_SIZE
#define LB_AFFINITY_MAP_SIZE 65536
#endif

#define LB_PASS   1
#define LB_REFUSE 0

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_service_key);
	__type(value, struct lb_service_value);
	__uint(max_entries, LB_SERVICES_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_lb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb_backend);
	__uint(max_entries, LB_BACKENDS_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_lb_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_revnat_key);
	__type(value, struct lb_revnat_value);
	__uint(max_entries, LB_REVNAT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_lb_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity_value);
	__uint(max_entries, LB_AFFINITY_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_lb_affinity SEC(".maps");

static __always_inline int lb_refuse(struct bpf_sock_addr *ctx)
{
	/* The refusal is a drop like any other: counted (158, Service backend not found)
	 * and reported as a flow, so `villi observe --verdict DROPPED` shows it. The
	 * source address is not known yet at connect(); the flow carries the VIP. */
	struct flow_event ev;

	__builtin_memset(&ev, 0, sizeof(ev));
	ev.ts_ns = bpf_ktime_get_ns();
	ev.dst_ip = ctx->user_ip4;
	ev.dport = bpf_ntohs((__u16)ctx->user_port);
	ev.protocol = (__u8)ctx->protocol;
	ev.event_type = EVENT_DROP;
	ev.drop_reason = DROP_NO_SERVICE;
	ev.direction = DIR_EGRESS;
	metrics_count(DROP_NO_SERVICE, DIR_EGRESS, 0);
	emit_event(&ev);
	/* connect()/sendmsg() fail with ECONNREFUSED right away (kernel ≥ 5.18). */
	bpf_set_retval(-ECONNREFUSED);
	return LB_REFUSE;
}

static __always_inline __u16 lb_select_slot(struct bpf_sock_addr *ctx, __u16 count)
{
	__u32 hash;

	if (ctx->protocol == IPPROTO_TCP)
		hash = bpf_get_prandom_u32();
	else
		hash = (__u32)((bpf_get_socket_cookie(ctx) * 0x9E3779B97F4A7C15ULL) >> 32);
	return (__u16)(hash % count) + 1;
}

/* The backend this client (netns) was given within the affinity timeout, if it is
 * still a backend of the service. */
static __always_inline struct lb_backend *
lb_affinity_backend(const struct lb_affinity_key *akey, const struct lb_service_value *svc,
		    __u64 now, __u32 *backend_id)
{
	struct lb_affinity_value *aff = bpf_map_lookup_elem(&villi_lb_affinity, akey);
	struct lb_backend *be;
	__u32 id;

	if (!aff || now - aff->last_used_ns > (__u64)svc->affinity_timeout * 1000000000ULL)
		return NULL;
	id = aff->backend_id;
	be = bpf_map_lookup_elem(&villi_lb_backends, &id);
	if (!be || be->service_id != svc->service_id)
		return NULL;
	*backend_id = id;
	return be;
}

static __always_inline int lb4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	struct lb_service_key key = {};
	struct lb_service_value *svc, *slot;
	struct lb_affinity_key akey = {};
	struct lb_revnat_key rkey = {};
	struct lb_revnat_value rval = {};
	struct lb_backend *be = NULL;
	__u32 backend_id = 0;
	__u64 now = 0;
	__u8 proto = ctx->protocol;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return LB_PASS;
	key.address = ctx->user_ip4;
	key.dport = (__u16)ctx->user_port;
	key.protocol = proto;
	svc = bpf_map_lookup_elem(&villi_lb_services, &key);
	if (!svc)
		return LB_PASS;                 /* not a service: leave the socket alone */
	if (svc->count == 0)
		return lb_refuse(ctx);

	if (svc->flags & LB_SVC_F_AFFINITY) {
		now = bpf_ktime_get_ns();
		akey.netns_cookie = bpf_get_netns_cookie(ctx);
		akey.service_id = svc->service_id;
		be = lb_affinity_backend(&akey, svc, now, &backend_id);
	}
	if (!be) {
		key.slot = lb_select_slot(ctx, svc->count);
		slot = bpf_map_lookup_elem(&villi_lb_services, &key);
		if (!slot)
			return lb_refuse(ctx);     /* only while the agent shrinks the service */
		backend_id = slot->backend_id;
		be = bpf_map_lookup_elem(&villi_lb_backends, &backend_id);
		if (!be)
			return lb_refuse(ctx);
	}
	if (svc->flags & LB_SVC_F_AFFINITY) {
		struct lb_affinity_value aval = { .last_used_ns = now, .backend_id = backend_id };

		bpf_map_update_elem(&villi_lb_affinity, &akey, &aval, BPF_ANY);
	}

	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.address = be->address;
	rkey.port = be->port;
	rval.address = key.address;
	rval.port = key.dport;
	rval.service_id = svc->service_id;
	bpf_map_update_elem(&villi_lb_revnat, &rkey, &rval, BPF_ANY);

	ctx->user_ip4 = be->address;
	ctx->user_port = be->port;
	return LB_PASS;
}

static __always_inline int lb4_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct lb_revnat_key rkey = {};
	struct lb_revnat_value *rval;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return LB_PASS;
	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.address = ctx->user_ip4;
	rkey.port = (__u16)ctx->user_port;
	rval = bpf_map_lookup_elem(&villi_lb_revnat, &rkey);
	if (rval) {
		ctx->user_ip4 = rval->address;
		ctx->user_port = rval->port;
	}
	return LB_PASS;
}

#endif /* __VILLI_LB_H */
