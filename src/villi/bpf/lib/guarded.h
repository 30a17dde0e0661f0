/* SPDX-License-Identifier: Apache-2.0 */
/* guarded.h — control-plane destinations pods may reach only when a policy says so.
 *
 * API: guarded_identity(pkt, &identity) returns 1 when the packet's destination is a
 * control-plane address and sets the identity to enforce policy against; 0 otherwise.
 *
 * Guarded: every address of a node (ipcache identity host or remote-node: the agent's
 * API ports, metrics ports) and each (address, port) in villi_guarded (the kvstore's
 * client endpoints, written by the agent as kube-apiserver: the control plane). A
 * guarded packet passes only when the pod's egress policy has an entry that allows
 * that identity; "no policy, so allowed" does not apply (as with a host firewall).
 */
#ifndef __VILLI_GUARDED_H
#define __VILLI_GUARDED_H

#include "common.h"
#include "config.h"
#include "parse.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct guarded_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, GUARDED_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} villi_guarded SEC(".maps");

static __always_inline int guarded_identity(const struct pkt *p, __u32 *identity)
{
	/* Pods (cluster identities) are never control plane: the hot pod-to-pod path
	 * does no lookup. Reserved and CIDR (local-scope) identities are checked. */
	if (*identity >= 256 && *identity < (1U << 24))
		return 0;

	struct guarded_key key = {
		.addr = p->daddr,
		.dport = bpf_htons(p->dport),
		.protocol = p->protocol,
	};
	struct ipcache_value *v = bpf_map_lookup_elem(&villi_guarded, &key);

	if (!v) {
		key.dport = 0;
		key.protocol = 0;
		v = bpf_map_lookup_elem(&villi_guarded, &key);
	}
	if (v) {
		*identity = v->identity;
		return 1;
	}
	return *identity == ID_HOST || *identity == ID_REMOTE_NODE;
}

#endif /* __VILLI_GUARDED_H */
