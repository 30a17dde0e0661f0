/* SPDX-License-Identifier: Apache-2.0 */
/* parse.h — packet parsing.
 *
 * API: parse_packet(skb, &pkt) fills struct pkt from an Ethernet/IPv4 frame and
 * returns 0, PARSE_NOT_IP4 for ARP and other non-IPv4 frames (the caller decides), or
 * a DROP_* reason for frames that claim IPv4 but are malformed. TCP, UDP and SCTP ports
 * come back in host order (SCTP's common header starts with the two ports, as UDP's
 * does, so SCTP port rules match like UDP ones). ICMP is normalised for conntrack: echo
 * request ⇒ sport = id, dport = 0; echo reply ⇒ sport = 0, dport = id, so the reverse
 * of a reply is its request. icmp_type/icmp_code keep the real ICMP header values for
 * flow events.
 */
#ifndef __VILLI_PARSE_H
#define __VILLI_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define PARSE_NOT_IP4 1

/* linux/icmp.h drags in libc socket headers that do not build for -target bpf. */
struct icmp4hdr {
	__u8   type;
	__u8   code;
	__sum16 checksum;
	__be16 id;
	__be16 sequence;
};
/* SCTP common header (RFC 9260 §3.1); linux/sctp.h is not self-contained for bpf. */
struct sctp_common_hdr {
	__be16 source;
	__be16 dest;
	__be32 vtag;
	__le32 checksum;
};
#ifndef IPPROTO_SCTP
#define IPPROTO_SCTP 132
#endif

#define ICMP_ECHOREPLY 0
#define ICMP_ECHO      8

struct pkt {
	__u32 saddr;        /* network order */
	__u32 daddr;
	__u16 sport;        /* host order, CT-normalised */
	__u16 dport;
	__u16 policy_port;  /* destination port, or the ICMP type */
	__u8  protocol;
	__u8  tcp_flags;
	__u32 len;
	__u16 eth_proto;    /* host order */
	__u8  icmp_reply;   /* ICMP echo reply */
	__u8  icmp_type;    /* real ICMP type and code (flow events only) */
	__u8  icmp_code;
	__u8  pad[3];
};

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_PSH 0x08
#define TCP_FLAG_ACK 0x10

static __always_inline int parse_packet(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	/* Headers of GSO/paged skbs may sit outside the linear area: pull them in once. */
	if (data + ETH_HLEN + sizeof(struct iphdr) + sizeof(struct tcphdr) > data_end) {
		bpf_skb_pull_data(skb, ETH_HLEN + sizeof(struct iphdr) + sizeof(struct tcphdr));
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return DROP_INVALID;
	p->eth_proto = bpf_ntohs(eth->h_proto);
	p->len = skb->len;
	if (p->eth_proto != ETH_P_IP)
		return PARSE_NOT_IP4;

	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return DROP_INVALID;
	if (ip->ihl < 5 || ip->version != 4)
		return DROP_INVALID;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->protocol = ip->protocol;
	p->sport = 0;
	p->dport = 0;
	p->policy_port = 0;
	p->tcp_flags = 0;
	p->icmp_reply = 0;
	p->icmp_type = 0;
	p->icmp_code = 0;

	/* Non-first fragments carry no L4 header: they match only port-wildcard rules. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return 0;

	void *l4 = (void *)ip + ip->ihl * 4;
	if (p->protocol == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return DROP_CT_INVALID_HDR;
		p->sport = bpf_ntohs(th->source);
		p->dport = bpf_ntohs(th->dest);
		p->policy_port = p->dport;
		p->tcp_flags = ((__u8 *)th)[13] & 0x1f;
	} else if (p->protocol == IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > data_end)
			return DROP_CT_INVALID_HDR;
		p->sport = bpf_ntohs(uh->source);
		p->dport = bpf_ntohs(uh->dest);
		p->policy_port = p->dport;
	} else if (p->protocol == IPPROTO_SCTP) {
		struct sctp_common_hdr *sh = l4;
		if ((void *)(sh + 1) > data_end)
			return DROP_CT_INVALID_HDR;
		p->sport = bpf_ntohs(sh->source);
		p->dport = bpf_ntohs(sh->dest);
		p->policy_port = p->dport;
	} else if (p->protocol == IPPROTO_ICMP) {
		struct icmp4hdr *ih = l4;
		if ((void *)(ih + 1) > data_end)
			return DROP_CT_INVALID_HDR;
		p->policy_port = ih->type;
		p->icmp_type = ih->type;
		p->icmp_code = ih->code;
		if (ih->type == ICMP_ECHO) {
			p->sport = bpf_ntohs(ih->id);
		} else if (ih->type == ICMP_ECHOREPLY) {
			p->dport = bpf_ntohs(ih->id);
			p->icmp_reply = 1;
		}
	}
	return 0;
}

#endif /* __VILLI_PARSE_H */
