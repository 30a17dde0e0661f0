/* SPDX-License-Identifier: Apache-2.0 */
/* proxy.h — steering redirected TCP and UDP packets to the node's L7 and DNS proxies.
 *
 * API: proxy_assign(skb, p, proxy_port) → 0 or DROP_PROXY_LOOKUP_FAILED /
 * DROP_PROXY_SET_FAILED. It assigns the packet to the proxy socket that owns its tuple
 * (an established or half-open connection: the proxy's accepted socket, or, for
 * replies, the proxy's upstream socket), else — when proxy_port is set — to the
 * proxy's listener on 0.0.0.0:proxy_port, and marks it MARK_MAGIC_TO_PROXY | port<<16
 * so the node namespace routes it locally (ip rule fwmark 0x200/0xf00 lookup 2004;
 * local 0.0.0.0/0 dev lo table 2004). tc ingress only (bpf_sk_assign's rule); the
 * caller returns TC_ACT_OK. Cilium's ctx_redirect_to_proxy_ingress4(), same steps.
 *
 * UDP (the DNS proxy): only the proxy's unconnected listener on 0.0.0.0:proxy_port is
 * looked up (bpf_sk_lookup_udp) — never a socket by the packet's tuple: the DNS proxy
 * briefly binds transparent sockets to the original destination to send answers, and a
 * query assigned to one of those would be lost.
 */
#ifndef __VILLI_PROXY_H
#define __VILLI_PROXY_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "common.h"
#include "parse.h"

#ifndef BPF_TCP_LISTEN
#define BPF_TCP_LISTEN 10
#endif
#ifndef BPF_TCP_TIME_WAIT
#define BPF_TCP_TIME_WAIT 6
#endif

static __always_inline int proxy_assign(struct __sk_buff *skb, const struct pkt *p,
					__u16 proxy_port)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	long ret;

	if (p->protocol == IPPROTO_UDP) {
		if (!proxy_port)
			return DROP_PROXY_LOOKUP_FAILED;
		tuple.ipv4.dport = bpf_htons(proxy_port);
		sk = bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
		if (!sk)
			return DROP_PROXY_LOOKUP_FAILED;
		goto assign;
	}
	tuple.ipv4.saddr = p->saddr;
	tuple.ipv4.daddr = p->daddr;
	tuple.ipv4.sport = bpf_htons(p->sport);
	tuple.ipv4.dport = bpf_htons(p->dport);
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN && sk->state != BPF_TCP_TIME_WAIT)
			goto assign;
		bpf_sk_release(sk);
	}
	if (!proxy_port)
		return DROP_PROXY_LOOKUP_FAILED;
	tuple.ipv4.saddr = 0;
	tuple.ipv4.sport = 0;
	tuple.ipv4.daddr = 0;
	tuple.ipv4.dport = bpf_htons(proxy_port);
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return DROP_PROXY_LOOKUP_FAILED;
assign:
	ret = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (ret)
		return DROP_PROXY_SET_FAILED;
	skb->mark = MARK_MAGIC_TO_PROXY | ((__u32)proxy_port << 16);
	return 0;
}

static __always_inline int from_proxy(const struct __sk_buff *skb)
{
	return (skb->mark & MARK_MAGIC_MASK) == MARK_MAGIC_FROM_PROXY;
}

#endif /* __VILLI_PROXY_H */
