/* SPDX-License-Identifier: Apache-2.0 */
/* common.h — vocabulary and every struct shared with Python.
 *
 * API: the map key/value and event record layouts, drop reasons, event types,
 * observation points, reserved identities, directions and CT states. Python mirrors
 * these in villi/datapath/abi.py; tests/unit/test_abi.py checks sizes and offsets
 * against the BTF clang emits for this header, so a change here that Python does not
 * follow fails the tests instead of corrupting maps.
 */
#ifndef __VILLI_COMMON_H
#define __VILLI_COMMON_H

#include <linux/types.h>

/* --- reserved identities (Cilium's numbers) --------------------------------- */
#define ID_UNKNOWN        0
#define ID_HOST           1
#define ID_WORLD          2
#define ID_UNMANAGED      3
#define ID_HEALTH         4
#define ID_INIT           5
#define ID_REMOTE_NODE    6
#define ID_KUBE_APISERVER 7
#define ID_INGRESS        8

/* --- directions, as seen by the endpoint the policy belongs to -------------- */
#define DIR_INGRESS 0
#define DIR_EGRESS  1

/* --- drop reasons (Cilium's numbers; 0 = forwarded) -------------------------- */
#define REASON_FORWARDED        0
#define DROP_INVALID_SIP        132
#define DROP_POLICY             133
#define DROP_INVALID            134
#define DROP_CT_INVALID_HDR     135
#define DROP_UNKNOWN_L3         139
#define DROP_UNKNOWN_L4         142
#define DROP_UNKNOWN_TARGET     150
#define DROP_CT_CREATE_FAILED   155
#define DROP_FRAG_NOSUPPORT     157
#define DROP_NO_SERVICE         158
#define DROP_UNSUPPORTED_L2     166
#define DROP_PROXY_LOOKUP_FAILED 178 /* no proxy socket for a redirected packet */
#define DROP_PROXY_SET_FAILED   179 /* bpf_sk_assign refused the proxy socket */
#define DROP_POLICY_DENY        181
/* villi's own: a pod's packet to a control-plane address (kvstore, node IPs) that
 * no egress rule of the pod allows explicitly (guarded.h). */
#define DROP_CONTROL_PLANE      190

/* --- event types (Cilium's CILIUM_NOTIFY_* numbers) ------------------------- */
#define EVENT_DROP           1
#define EVENT_TRACE          4
#define EVENT_POLICY_VERDICT 5

/* --- observation points (Cilium's trace points) ----------------------------- */
#define OBS_TO_LXC     0   /* to-endpoint */
#define OBS_TO_PROXY   1   /* to-proxy (verdict REDIRECTED) */
#define OBS_TO_STACK   3   /* to-stack */
#define OBS_FROM_LXC   5   /* from-endpoint */

/* --- conntrack states (Cilium's ct_status) ---------------------------------- */
#define CT_NEW         0
#define CT_ESTABLISHED 1
#define CT_REPLY       2
#define CT_RELATED     3

/* --- policy match types (Cilium's POLICY_MATCH_*) --------------------------- */
#define MATCH_NONE     0
#define MATCH_L3_ONLY  1
#define MATCH_L3_L4    2
#define MATCH_L4_ONLY  3
#define MATCH_ALL      4

/* --- monitor aggregation levels -------------------------------------------- */
#define AGGREGATION_NONE    0 /* an event for every packet */
#define AGGREGATION_LOW     1 /* … except replies seen again at the receiving side */
#define AGGREGATION_MEDIUM  2 /* new connections, TCP flag changes, periodic, drops */
#define AGGREGATION_MAXIMUM 3 /* drops and new connections only */

/* --- endpoint flags -------------------------------------------------------- */
#define EP_F_INGRESS_ENFORCED  0x01 /* no matching entry ⇒ drop (default deny) */
#define EP_F_EGRESS_ENFORCED   0x02
#define EP_F_INGRESS_LOOKUP    0x04 /* the endpoint has ingress entries to look up */
#define EP_F_EGRESS_LOOKUP     0x08
#define EP_F_AUDIT             0x10 /* policy audit mode for this endpoint */

/* --- policy enforcement modes (the agent's --enable-policy, Cilium's) ------ */
#define ENFORCE_DEFAULT 0 /* enforce where a rule selects the endpoint */
#define ENFORCE_ALWAYS  1 /* default deny on every endpoint, both directions */
#define ENFORCE_NEVER   2 /* no policy at all (allow and deny rules ignored) */

/* --- villi_policy_cfg slots (policy.h): one u32 each, one writer each ------- */
#define POLICY_CFG_ENFORCEMENT      0 /* ENFORCE_*; the agent */
#define POLICY_CFG_AUDIT            1 /* node-wide audit mode (flag, node or cluster
                                       * setting); the agent */
#define POLICY_CFG_DEGRADED         2 /* the last-resort switch: unix time it was thrown,
                                       * 0 = off; only `villi datapath policy
                                       * degrade|restore` writes it, never the agent */
#define POLICY_CFG_CLUSTER_DEGRADED 3 /* `villi policy degrade --all` (kvstore); the agent */
#define POLICY_CFG_SLOTS            8

/* --- event flags ----------------------------------------------------------- */
#define EVF_IS_REPLY   0x01
#define EVF_REDIRECTED 0x02 /* delivered by bpf_redirect_peer, bypassing the stack */
#define EVF_TO_PROXY   0x04 /* steered to the node's L7 proxy (bpf_sk_assign) */

/* --- L7 proxy redirection (Cilium's MARK_MAGIC_* values) --------------------- */
#define MARK_MAGIC_MASK     0x0F00
#define MARK_MAGIC_TO_PROXY 0x0200 /* | proxy port << 16; routed locally (table 2004) */
#define MARK_MAGIC_FROM_PROXY 0x0A00 /* SO_MARK of the proxy's upstream sockets */

/* --- conntrack proxy flags ------------------------------------------------- */
#define CT_F_TO_PROXY     0x01 /* original-direction packets go to proxy_port */
#define CT_F_PROXY_RETURN 0x02 /* opened by the proxy: replies go back to its socket */

/* ipcache: LPM trie, IPv4 prefix → identity and the node the address lives on. */
struct ipcache_key {
	__u32 prefixlen;
	__u32 addr;          /* network order */
};

struct ipcache_value {
	__u32 identity;
	__u32 node_ip;       /* network order; 0 = this node or not a pod */
};

/* A guarded control-plane destination: address, port and protocol (port 0 and
 * protocol 0: every port of the address). The value is an ipcache_value whose
 * identity names what lives there (kube-apiserver for the kvstore). */
struct guarded_key {
	__u32 addr;          /* network order */
	__u16 dport;         /* network order */
	__u8  protocol;
	__u8  pad;
};

/* endpoints: hash, pod IPv4 → the local endpoint that owns it. */
struct endpoint_key {
	__u32 addr;          /* network order */
};

struct endpoint_value {
	__u32 ifindex;       /* host-side veth */
	__u32 identity;
	__u16 endpoint_id;
	__u16 flags;         /* EP_F_* */
	__u8  pod_mac[6];    /* the pod's eth0 */
	__u8  host_mac[6];   /* the host-side veth */
};

/* policy: LPM trie shared by all endpoints of the node.
 * Fixed prefix: endpoint_id + identity + direction (72 bits); then protocol (8) and
 * the destination port (16, network order) as a prefix, which is how a port range
 * becomes a handful of entries. identity 0 = any peer; protocol 0 = any (then the
 * port must be fully wildcarded). */
struct policy_key {
	__u32 prefixlen;
	__u32 endpoint_id;
	__u32 identity;
	__u8  direction;
	__u8  protocol;
	__u16 dport;         /* network order */
	__u32 pad;           /* never matched (prefixes stop at 96 bits): it makes the key
	                      * data 16 bytes, so the value that follows it in the trie node
	                      * is 8-byte aligned and the atomic counter adds below never
	                      * straddle a cache line (a split lock: ~60 us per packet on
	                      * this VM, a panic on hosts with split-lock detection). */
};
#define POLICY_STATIC_PREFIX 72
#define POLICY_FULL_PREFIX   96

struct policy_value {
	__u8  deny;
	__u8  match_type;    /* MATCH_*, set by the agent from the key's shape */
	__u16 proxy_port;    /* host order; non-zero: L7 redirect to this proxy port */
	__u32 cookie;        /* which rule wrote the entry (flow explanations) */
	__u64 packets;
	__u64 bytes;
};

/* ct: LRU hash. One entry per connection and per policy side: the egress side of the
 * client endpoint and the ingress side of the server endpoint are separate entries, so
 * each endpoint's policy is applied once per connection on its own node. */
struct ct_key {
	__u32 saddr;         /* original direction, network order */
	__u32 daddr;
	__u16 sport;         /* host order; ICMP echo: sport = id, dport = 0 */
	__u16 dport;
	__u8  protocol;
	__u8  direction;     /* DIR_INGRESS / DIR_EGRESS of the owning endpoint */
	__u16 pad;
};

struct ct_value {
	__u64 packets;
	__u64 bytes;
	__u32 expires;       /* seconds of bpf_ktime_get_ns() */
	__u32 last_report;   /* seconds: last forwarded event for this entry */
	__u32 peer_identity; /* identity of the other side when the entry was made */
	__u32 cookie;
	__u16 endpoint_id;
	__u8  tx_flags_seen; /* TCP flags seen in the original direction */
	__u8  rx_flags_seen; /* … in the reply direction */
	__u8  closing;       /* 1 after FIN or RST */
	__u8  proxy_flags;   /* CT_F_TO_PROXY, CT_F_PROXY_RETURN */
	__u16 proxy_port;    /* host order: the proxy listener of a redirected connection */
};

/* events: ringbuf of fixed-size records (with the 8-byte ringbuf header, 64 bytes). */
struct flow_event {
	__u64 ts_ns;          /* bpf_ktime_get_ns() */
	__u32 src_ip;         /* network order */
	__u32 dst_ip;
	__u32 src_identity;
	__u32 dst_identity;
	__u16 sport;          /* host order */
	__u16 dport;
	__u32 len;            /* packet length */
	__u32 cookie;         /* deciding policy rule, 0 = none */
	__u32 ifindex;
	__u16 endpoint_id;    /* the endpoint whose policy applied */
	__u8  protocol;
	__u8  tcp_flags;      /* FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10 */
	__u8  event_type;     /* EVENT_* */
	__u8  drop_reason;    /* 0 = forwarded */
	__u8  direction;      /* DIR_* */
	__u8  obs_point;      /* OBS_* */
	__u8  ct_state;       /* CT_* */
	__u8  match_type;     /* MATCH_* */
	__u8  flags;          /* EVF_* */
	__u8  icmp_type;      /* ICMP type and code as on the wire (protocol 1 only) */
	__u8  icmp_code;
	__u8  audit_reason;   /* forwarded only because of audit mode: the DROP_* policy
	                       * would have applied (verdict AUDIT); 0 otherwise */
	__u8  pad[2];
};

/* metrics: per-CPU array indexed by (reason << 1) | direction. */
struct metrics_value {
	__u64 packets;
	__u64 bytes;
};
#define METRICS_SLOTS 512


/* --- socket load balancing (lb.h, sock.bpf.c) ------------------------------- */
#define LB_SVC_F_AFFINITY 0x01  /* ClientIP session affinity (lb_service_value.flags) */

/* lb_services: hash. {VIP, port, protocol, slot 0} is a service port's frontend entry
 * (backend count, service id, affinity); {…, slot 1..count} map slots to backend ids. */
struct lb_service_key {
	__u32 address;          /* VIP, network order */
	__u16 dport;            /* network order */
	__u16 slot;             /* 0 = frontend; 1..count = backend slots */
	__u8  protocol;         /* IPPROTO_TCP / IPPROTO_UDP */
	__u8  pad[3];
};

struct lb_service_value {
	__u32 backend_id;       /* slot entries */
	__u32 affinity_timeout; /* frontend: seconds */
	__u16 count;            /* frontend: number of backend slots (0 = refuse) */
	__u16 service_id;       /* frontend and slots: id of the service port */
	__u8  flags;            /* LB_SVC_F_* */
	__u8  pad[3];
};

/* lb_backends: hash, backend id → where connections go. */
struct lb_backend {
	__u32 address;          /* network order */
	__u16 port;             /* network order */
	__u16 service_id;       /* the service port the backend belongs to */
};

/* lb_revnat: LRU hash, {socket cookie, backend} → the VIP the application asked for
 * (recvmsg4 rewrites UDP reply sources, getpeername4 the peer address). */
struct lb_revnat_key {
	__u64 cookie;
	__u32 address;          /* backend, network order */
	__u16 port;             /* network order */
	__u16 pad;
};

struct lb_revnat_value {
	__u32 address;          /* VIP, network order */
	__u16 port;             /* network order */
	__u16 service_id;
};

/* lb_affinity: LRU hash, {client netns cookie, service id} → its backend. */
struct lb_affinity_key {
	__u64 netns_cookie;
	__u16 service_id;
	__u16 pad[3];
};

struct lb_affinity_value {
	__u64 last_used_ns;     /* bpf_ktime_get_ns() */
	__u32 backend_id;
	__u32 pad;
};

#endif /* __VILLI_COMMON_H */
