/* SPDX-License-Identifier: Apache-2.0 */
/* policy.h — identity-based L3/L4 policy.
 *
 * API: policy_check(ep, direction, peer_identity, pkt, &res) returns 0 to allow or a
 * DROP_* reason, and fills res (cookie of the deciding rule, match type, and the L7
 * proxy port when the deciding entry redirects to the proxy).
 *
 * Lookup order: two longest-prefix lookups in the LPM trie, one with the peer's
 * identity and one with the wildcard identity 0; within each, the most specific
 * protocol/port prefix wins. A deny found by either lookup wins over any allow (the
 * agent drops allow entries that a deny of the same identity covers, so a longest
 * match never hides a deny). No match: drop if the endpoint is enforced in that
 * direction (default deny), allow otherwise.
 *
 * Modes (villi_policy_cfg, one u32 per slot, each slot with one writer):
 *   POLICY_CFG_ENFORCEMENT  default: as above; always: default deny on every endpoint
 *                           in both directions; never: allow everything, deny rules too.
 *   policy_audited(ep)      1 when a packet policy would drop must be forwarded and
 *                           reported as AUDIT instead: the endpoint's audit flag, the
 *                           node's audit mode, or a degraded node (the last-resort switch,
 *                           written only by `villi datapath policy degrade`, so it works
 *                           with the agent and the kvstore down). The datapath reads the
 *                           slots for every decision: a change applies to the next packet.
 */
#ifndef __VILLI_POLICY_H
#define __VILLI_POLICY_H

#include "common.h"
#include "config.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, POLICY_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, POLICY_CFG_SLOTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_policy_cfg SEC(".maps");

static __always_inline __u32 policy_cfg(__u32 slot)
{
	__u32 *v = bpf_map_lookup_elem(&villi_policy_cfg, &slot);

	return v ? *v : 0;
}

/* Audit mode in force for this endpoint (looked up only when policy would drop). */
static __always_inline int policy_audited(const struct endpoint_value *ep)
{
	return (ep->flags & EP_F_AUDIT) || policy_cfg(POLICY_CFG_AUDIT) ||
	       policy_cfg(POLICY_CFG_DEGRADED) || policy_cfg(POLICY_CFG_CLUSTER_DEGRADED);
}

struct policy_result {
	__u32 cookie;
	__u16 proxy_port;
	__u8  match_type;
	__u8  applies;       /* the endpoint's policy is in force in this direction */
};

static __always_inline int policy_check(const struct endpoint_value *ep, __u8 direction,
					__u32 peer_identity, const struct pkt *p,
					struct policy_result *res)
{
	__u16 lookup_flag = direction == DIR_INGRESS ? EP_F_INGRESS_LOOKUP : EP_F_EGRESS_LOOKUP;
	__u16 enforce_flag = direction == DIR_INGRESS ? EP_F_INGRESS_ENFORCED : EP_F_EGRESS_ENFORCED;
	struct policy_value *exact = NULL, *any = NULL, *hit;
	__u32 mode = policy_cfg(POLICY_CFG_ENFORCEMENT);
	int enforced;

	res->cookie = 0;
	res->proxy_port = 0;
	res->match_type = MATCH_NONE;
	res->applies = 0;
	if (mode == ENFORCE_NEVER)
		return 0;
	enforced = (ep->flags & enforce_flag) || mode == ENFORCE_ALWAYS;
	if (!(ep->flags & lookup_flag)) {
		res->applies = enforced;
		return enforced ? DROP_POLICY : 0;
	}
	res->applies = 1;

	struct policy_key key = {
		.prefixlen = POLICY_FULL_PREFIX,
		.endpoint_id = ep->endpoint_id,
		.identity = peer_identity,
		.direction = direction,
		.protocol = p->protocol,
		.dport = bpf_htons(p->policy_port),
	};
	exact = bpf_map_lookup_elem(&villi_policy, &key);
	key.identity = 0;
	any = bpf_map_lookup_elem(&villi_policy, &key);

	if ((exact && exact->deny) || (any && any->deny)) {
		hit = (exact && exact->deny) ? exact : any;
		__sync_fetch_and_add(&hit->packets, 1);
		__sync_fetch_and_add(&hit->bytes, p->len);
		res->cookie = hit->cookie;
		res->match_type = hit->match_type;
		return DROP_POLICY_DENY;
	}
	hit = exact ? exact : any;
	if (hit) {
		__sync_fetch_and_add(&hit->packets, 1);
		__sync_fetch_and_add(&hit->bytes, p->len);
		res->cookie = hit->cookie;
		res->match_type = hit->match_type;
		res->proxy_port = hit->proxy_port;
		return 0;
	}
	return enforced ? DROP_POLICY : 0;
}

#endif /* __VILLI_POLICY_H */
