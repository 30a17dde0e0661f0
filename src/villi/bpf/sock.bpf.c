/* SPDX-License-Identifier: Apache-2.0 */
/* sock.bpf.c — socket-level service load balancing, attached to a node's cgroup.
 *
 *   sock4_connect      cgroup/connect4: connect() to a ClusterIP:port goes to a
 *                      backend instead (TCP and connected UDP); a service without
 *                      backends refuses at once with ECONNREFUSED.
 *   sock4_sendmsg      cgroup/sendmsg4: the same for unconnected UDP (sendto()).
 *   sock4_recvmsg      cgroup/recvmsg4: UDP replies from a backend appear to come
 *                      from the VIP the application sent to.
 *   sock4_getpeername  cgroup/getpeername4: getpeername() of a translated socket
 *                      returns the VIP, as the application expects.
 *
 * The translation happens once per socket, so the packets themselves carry the
 * backend's address: the tc programs on the veths apply policy (and conntrack) to the
 * backend's identity, as Cilium's socket LB does, and no per-packet NAT is needed.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "lib/common.h"
#include "lib/config.h"
#include "lib/lb.h"

SEC("cgroup/connect4")
int sock4_connect(struct bpf_sock_addr *ctx)
{
	return lb4_xlate_fwd(ctx);
}

SEC("cgroup/sendmsg4")
int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return lb4_xlate_fwd(ctx);
}

SEC("cgroup/recvmsg4")
int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	return lb4_xlate_rev(ctx);
}

SEC("cgroup/getpeername4")
int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	return lb4_xlate_rev(ctx);
}

char _license[] SEC("license") = "GPL";
