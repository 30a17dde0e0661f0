/* SPDX-License-Identifier: Apache-2.0 */
/* lxc.bpf.c — the programs on every pod's host-side veth.
 *
 *   from_pod  tc ingress: traffic leaving the pod. Enforces the pod's egress policy,
 *             tracks the connection and, when the destination is a pod on this node,
 *             also its ingress policy before handing the packet straight to that pod's
 *             netns with bpf_redirect_peer (no trip through the node's IP stack).
 *   to_pod    tc egress: traffic entering the pod through the node's stack (other
 *             nodes, the node itself). Enforces the pod's ingress policy.
 *   from_netdev  tc ingress of the node's underlay device: ingress L7 redirects for
 *             traffic from other nodes (see below).
 *
 * L7: a connection whose policy entry carries a proxy port is steered to the node's
 * proxy with bpf_sk_assign (lib/proxy.h) instead of being delivered: in from_pod for the
 * source's egress rules and for a same-node destination's ingress rules. Connections
 * the proxy opens (SO_MARK MARK_MAGIC_FROM_PROXY) are allowed through to_pod without a
 * second redirect and their CT entry is flagged, so the server's replies are assigned
 * back to the proxy's socket; ordinary packets never pay a socket lookup. Port-53
 * entries with DNS rules steer UDP and TCP to the DNS proxy the same way.
 *
 * Non-IPv4 traffic: ARP passes untouched (pods reach their gateway through a static
 * neighbour entry, but the node still resolves pod addresses); IPv6 and every other
 * L3 protocol are dropped with reason 139 (Unsupported L3 protocol) and reported.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "lib/common.h"
#include "lib/config.h"
#include "lib/parse.h"
#include "lib/ipcache.h"
#include "lib/guarded.h"
#include "lib/endpoints.h"
#include "lib/policy.h"
#include "lib/conntrack.h"
#include "lib/events.h"
#include "lib/metrics.h"
#include "lib/proxy.h"

static __always_inline void event_init(struct flow_event *ev, struct __sk_buff *skb,
				       const struct pkt *p, __u16 ep_id, __u8 dir)
{
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	ev->src_ip = p->saddr;
	ev->dst_ip = p->daddr;
	ev->sport = p->icmp_reply ? p->dport : p->sport;
	ev->dport = p->icmp_reply ? 0 : p->dport;
	ev->len = p->len;
	ev->ifindex = skb->ifindex;
	ev->endpoint_id = ep_id;
	ev->protocol = p->protocol;
	ev->tcp_flags = p->tcp_flags;
	ev->icmp_type = p->icmp_type;
	ev->icmp_code = p->icmp_code;
	ev->direction = dir;
}

static __always_inline int drop_packet(struct __sk_buff *skb, const struct pkt *p, __u8 reason,
				       __u8 dir, __u16 ep_id, __u32 src_id, __u32 dst_id,
				       __u32 cookie, __u8 match_type, __u8 ct_state)
{
	struct flow_event ev;

	metrics_count(reason, dir, p->len);
	event_init(&ev, skb, p, ep_id, dir);
	ev.event_type = EVENT_DROP;
	ev.drop_reason = reason;
	ev.src_identity = src_id;
	ev.dst_identity = dst_id;
	ev.cookie = cookie;
	ev.match_type = match_type;
	ev.ct_state = ct_state;
	emit_event(&ev);
	return TC_ACT_SHOT;
}

/* Decision of one endpoint's policy side for one packet; see enforce(). */
struct verdict {
	__u32 cookie;
	__u8  reason;       /* 0 = allowed */
	__u8  ct_state;
	__u8  report;       /* a forwarded event is due under the aggregation level */
	__u8  match_type;
	__u8  proxy_return; /* a reply to a connection the proxy opened */
	__u8  audit_reason; /* forwarded by audit mode: the drop policy would have made */
	__u16 proxy_port;   /* non-zero: steer to this L7 proxy port */
};

/* Hubble's policy-verdict event (type 5): the decision of one endpoint's policy for the
 * first packet of a connection in one direction, emitted where the policy applies (an
 * enforced or looked-up direction, or a guarded destination). Replies never get one:
 * they are CT_REPLY and skip the policy. */
static __always_inline void policy_verdict(struct __sk_buff *skb, const struct pkt *p,
					   const struct endpoint_value *ep, __u8 dir,
					   __u32 peer_id, const struct verdict *v)
{
	struct flow_event ev;

	event_init(&ev, skb, p, ep->endpoint_id, dir);
	ev.event_type = EVENT_POLICY_VERDICT;
	ev.drop_reason = v->reason;
	ev.audit_reason = v->audit_reason;
	ev.src_identity = dir == DIR_INGRESS ? peer_id : ep->identity;
	ev.dst_identity = dir == DIR_INGRESS ? ep->identity : peer_id;
	ev.cookie = v->cookie;
	ev.match_type = v->match_type;
	ev.ct_state = CT_NEW;
	emit_event(&ev);
}

/* Conntrack + policy for endpoint `ep` in direction `dir` against `peer_id`.
 * `guarded`: the peer is a control-plane destination (guarded.h), which only an
 * explicit policy entry opens (audit mode and the degradation switch never open it).
 * `by_proxy`: the packet comes from the proxy's upstream socket (never redirected).
 * Audit mode (policy_audited): what policy would drop is allowed, tracked like any
 * connection and reported with audit_reason set; the policy is looked up again for
 * every packet in the original direction, so leaving audit applies to the next one. */
static __always_inline void enforce(struct __sk_buff *skb, const struct pkt *p,
				    const struct endpoint_value *ep, __u8 dir, __u32 peer_id,
				    __u8 guarded, struct verdict *v, int by_proxy)
{
	struct ct_value *ct = NULL;
	struct policy_result res = {};
	__u8 flags;
	int ret;

	v->reason = 0;
	v->report = 0;
	v->cookie = 0;
	v->match_type = MATCH_NONE;
	v->proxy_return = 0;
	v->audit_reason = 0;
	v->proxy_port = 0;
	v->ct_state = ct_lookup(p, dir, &ct);
	if (v->ct_state == CT_REPLY && ct) {
		v->report = ct_update(ct, p, 1);
		v->cookie = ct->cookie;
		v->proxy_return = ct->proxy_flags & CT_F_PROXY_RETURN;
		return;
	}
	ret = policy_check(ep, dir, peer_id, p, &res);
	v->cookie = res.cookie;
	v->match_type = res.match_type;
	if (ret) {
		if (!policy_audited(ep)) {
			v->reason = ret;
			goto verdict;
		}
		v->audit_reason = ret;
	}
	if (guarded && (res.match_type == MATCH_NONE || v->audit_reason)) {
		v->reason = DROP_CONTROL_PLANE;
		v->audit_reason = 0;
		goto verdict;
	}
	if (!by_proxy && (p->protocol == IPPROTO_TCP || p->protocol == IPPROTO_UDP))
		v->proxy_port = res.proxy_port;
	if (v->ct_state == CT_NEW) {
		/* Unsolicited echo replies are allowed by policy but start no connection. */
		if (!p->icmp_reply) {
			flags = (v->proxy_port ? CT_F_TO_PROXY : 0) |
				(by_proxy ? CT_F_PROXY_RETURN : 0);
			ret = ct_create(p, dir, peer_id, ep->endpoint_id, res.cookie, flags,
					v->proxy_port);
			if (ret) {
				v->reason = ret;
				return;
			}
		}
		v->report = 1; /* new connections are reported at every level */
	} else if (ct) {
		v->report = ct_update(ct, p, 0);
		/* A proxied connection stays proxied whatever the policy became since. */
		v->proxy_port = (ct->proxy_flags & CT_F_TO_PROXY) ? ct->proxy_port : 0;
	}
verdict:
	if (v->ct_state == CT_NEW && !p->icmp_reply && (res.applies || guarded))
		policy_verdict(skb, p, ep, dir, peer_id, v);
}

static __always_inline void trace_forwarded(struct __sk_buff *skb, const struct pkt *p,
					    const struct verdict *v, __u16 ep_id, __u8 dir,
					    __u32 src_id, __u32 dst_id, __u8 obs, __u8 flags)
{
	struct flow_event ev;

	metrics_count(REASON_FORWARDED, dir, p->len);
	if (!v->report)
		return;
	event_init(&ev, skb, p, ep_id, dir);
	ev.event_type = EVENT_TRACE;
	ev.src_identity = src_id;
	ev.dst_identity = dst_id;
	ev.cookie = v->cookie;
	ev.match_type = v->match_type;
	ev.ct_state = v->ct_state;
	ev.obs_point = obs;
	ev.flags = flags | (v->ct_state == CT_REPLY ? EVF_IS_REPLY : 0);
	ev.audit_reason = v->audit_reason;
	emit_event(&ev);
}

/* Steer to the proxy: assign the socket, report to-proxy (REDIRECTED), or drop. */
static __always_inline int to_proxy(struct __sk_buff *skb, const struct pkt *p,
				    const struct verdict *v, __u16 ep_id, __u8 dir,
				    __u32 src_id, __u32 dst_id)
{
	int ret = proxy_assign(skb, p, v->proxy_port);

	if (ret)
		return drop_packet(skb, p, ret, dir, ep_id, src_id, dst_id, v->cookie,
				   v->match_type, v->ct_state);
	trace_forwarded(skb, p, v, ep_id, dir, src_id, dst_id, OBS_TO_PROXY, EVF_TO_PROXY);
	return TC_ACT_OK;
}

static __always_inline int not_ip4(struct __sk_buff *skb, const struct pkt *p, __u8 dir)
{
	if (p->eth_proto == ETH_P_ARP)
		return TC_ACT_OK;
	return drop_packet(skb, p, DROP_UNKNOWN_L3, dir, 0, 0, 0, 0, MATCH_NONE, CT_NEW);
}

SEC("tc")
int from_pod(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct verdict eg;
	struct endpoint_value *ep;
	__u32 dst_id;
	__u8 guarded;
	int ret;

	ret = parse_packet(skb, &p);
	if (ret == PARSE_NOT_IP4)
		return not_ip4(skb, &p, DIR_EGRESS);
	if (ret)
		return drop_packet(skb, &p, ret, DIR_EGRESS, 0, 0, 0, 0, MATCH_NONE, CT_NEW);

	ep = endpoint_lookup(p.saddr);
	if (!ep || ep->ifindex != skb->ifindex)
		return drop_packet(skb, &p, DROP_INVALID_SIP, DIR_EGRESS, 0, ID_UNKNOWN,
				   ipcache_identity(p.daddr), 0, MATCH_NONE, CT_NEW);

	dst_id = ipcache_identity(p.daddr);
	guarded = guarded_identity(&p, &dst_id);
	enforce(skb, &p, ep, DIR_EGRESS, dst_id, guarded, &eg, 0);
	if (eg.reason)
		return drop_packet(skb, &p, eg.reason, DIR_EGRESS, ep->endpoint_id, ep->identity,
				   dst_id, eg.cookie, eg.match_type, eg.ct_state);
	/* Egress L7 rules, or a reply to a connection the proxy opened. */
	if (eg.proxy_port || eg.proxy_return)
		return to_proxy(skb, &p, &eg, ep->endpoint_id, DIR_EGRESS, ep->identity, dst_id);

#if ENABLE_HOST_ROUTING
	struct endpoint_value *dst_ep = endpoint_lookup(p.daddr);
	struct verdict in;

	if (dst_ep) {
		/* Same-node destination: its ingress policy runs here, then the packet goes
		 * straight into its netns. The src identity is ours, no ipcache needed. */
		enforce(skb, &p, dst_ep, DIR_INGRESS, ep->identity, 0, &in, 0);
		if (in.reason) {
			trace_forwarded(skb, &p, &eg, ep->endpoint_id, DIR_EGRESS, ep->identity,
					dst_id, OBS_FROM_LXC, 0);
			return drop_packet(skb, &p, in.reason, DIR_INGRESS, dst_ep->endpoint_id,
					   ep->identity, dst_ep->identity, in.cookie,
					   in.match_type, in.ct_state);
		}
		if (in.proxy_port) {
			trace_forwarded(skb, &p, &eg, ep->endpoint_id, DIR_EGRESS, ep->identity,
					dst_id, OBS_FROM_LXC, 0);
			return to_proxy(skb, &p, &in, dst_ep->endpoint_id, DIR_INGRESS,
					ep->identity, dst_ep->identity);
		}
		trace_forwarded(skb, &p, &eg, ep->endpoint_id, DIR_EGRESS, ep->identity,
				dst_id, OBS_FROM_LXC, EVF_REDIRECTED);
		trace_forwarded(skb, &p, &in, dst_ep->endpoint_id, DIR_INGRESS, ep->identity,
				dst_ep->identity, OBS_TO_LXC, EVF_REDIRECTED);
		if (bpf_skb_store_bytes(skb, 0, dst_ep->pod_mac, 6, 0) < 0 ||
		    bpf_skb_store_bytes(skb, 6, dst_ep->host_mac, 6, 0) < 0)
			return TC_ACT_SHOT;
		return bpf_redirect_peer(dst_ep->ifindex, 0);
	}
#endif
	trace_forwarded(skb, &p, &eg, ep->endpoint_id, DIR_EGRESS, ep->identity, dst_id,
			OBS_TO_STACK, 0);
	return TC_ACT_OK;
}

SEC("tc")
int to_pod(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct verdict in;
	struct endpoint_value *ep;
	__u32 src_id;
	int ret;

	ret = parse_packet(skb, &p);
	if (ret == PARSE_NOT_IP4)
		return not_ip4(skb, &p, DIR_INGRESS);
	if (ret)
		return drop_packet(skb, &p, ret, DIR_INGRESS, 0, 0, 0, 0, MATCH_NONE, CT_NEW);

	src_id = ipcache_identity(p.saddr);
	ep = endpoint_lookup(p.daddr);
	if (!ep || ep->ifindex != skb->ifindex)
		return drop_packet(skb, &p, DROP_UNKNOWN_TARGET, DIR_INGRESS, 0, src_id,
				   ID_UNKNOWN, 0, MATCH_NONE, CT_NEW);

	enforce(skb, &p, ep, DIR_INGRESS, src_id, 0, &in, from_proxy(skb));
	if (in.reason)
		return drop_packet(skb, &p, in.reason, DIR_INGRESS, ep->endpoint_id, src_id,
				   ep->identity, in.cookie, in.match_type, in.ct_state);
	/* Ingress L7 for traffic through the stack (another node, the node itself): tc
	 * egress cannot assign sockets, and letting it through would skip the L7 rules. */
	if (in.proxy_port)
		return drop_packet(skb, &p, DROP_PROXY_LOOKUP_FAILED, DIR_INGRESS,
				   ep->endpoint_id, src_id, ep->identity, in.cookie,
				   in.match_type, in.ct_state);
	trace_forwarded(skb, &p, &in, ep->endpoint_id, DIR_INGRESS, src_id, ep->identity,
			OBS_TO_LXC, 0);
	return TC_ACT_OK;
}

/* from_netdev  tc ingress of the node's underlay device: TCP from other nodes to a
 * local endpoint's L7 port is assigned to the proxy here, since to_pod (tc egress)
 * cannot assign sockets. Everything else passes untouched (to_pod enforces it); the
 * cost for ordinary traffic is one CT lookup, plus a policy lookup per new connection. */
SEC("tc")
int from_netdev(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct endpoint_value *ep;
	struct ct_value *ct = NULL;
	struct policy_result res = {};
	struct verdict in;
	__u32 src_id;
	int state;

	if (parse_packet(skb, &p) || p.protocol != IPPROTO_TCP)
		return TC_ACT_OK;
	ep = endpoint_lookup(p.daddr);
	if (!ep)
		return TC_ACT_OK;
	state = ct_lookup(&p, DIR_INGRESS, &ct);
	if (state == CT_REPLY || (state == CT_ESTABLISHED && ct &&
				  !(ct->proxy_flags & CT_F_TO_PROXY)))
		return TC_ACT_OK;
	/* Not a SYN and no CT entry: a reply to a connection villi-proxy opened from this
	 * node to another (egress L7), which no program saw leave. Only such packets (and
	 * strays) pay a socket lookup; ordinary replies are CT_REPLY above. */
	if (state == CT_NEW && (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN) {
		proxy_assign(skb, &p, 0); /* not the proxy's: unchanged, to_pod decides */
		return TC_ACT_OK;
	}
	src_id = ipcache_identity(p.saddr);
	if (state == CT_NEW && (policy_check(ep, DIR_INGRESS, src_id, &p, &res) ||
				!res.proxy_port))
		return TC_ACT_OK;
	enforce(skb, &p, ep, DIR_INGRESS, src_id, 0, &in, 0);
	if (in.reason)
		return drop_packet(skb, &p, in.reason, DIR_INGRESS, ep->endpoint_id, src_id,
				   ep->identity, in.cookie, in.match_type, in.ct_state);
	if (!in.proxy_port)
		return TC_ACT_OK;
	return to_proxy(skb, &p, &in, ep->endpoint_id, DIR_INGRESS, src_id, ep->identity);
}

char _license[] SEC("license") = "GPL";
