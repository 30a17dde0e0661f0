"""The lab's wires: an underlay namespace with a bridge, and one veth per node.

    underlay netns (villi-lab-<id>-underlay)          node netns (villi-lab-<id>-nodeN)
      br0  172.30.0.1/24  (etcd, "world" services)      eth0  172.30.0.(10+N)/24
           172.30.0.254/24 (a second "world" address)    └─ veth peer "nN" on br0
      unreachable 10.64.0.0/10
      10.64.x.0/24 via <node IP>   (replies to pods that talk to the underlay)

Everything is created inside lab namespaces: the veth is made in the underlay
namespace and its peer moved into the node namespace, so the root namespace never
holds a lab link, address or route, not even for an instant. The underlay routes pod
CIDRs (so pods can reach "world" addresses on it and get replies), hence it also
holds the ``unreachable`` route for the whole cluster CIDR, as every node does.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from villi._nsenter import netns_path
from villi.errors import NetnsError
from villi.netns import create_netns, routes
from villi.netns._ipr import ipr_in

BRIDGE = "br0"
DEFAULT_UNDERLAY = "172.30.0.0/24"
FIRST_NODE_HOST = 10          # node N gets host number 10 + N


@dataclass(frozen=True)
class Underlay:
    netns: str
    cidr: str

    @property
    def net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)

    @property
    def gateway(self) -> str:
        """The bridge's address: etcd listens here; a "world" peer for pods."""
        return str(self.net.network_address + 1)

    @property
    def world_ip(self) -> str:
        """A second underlay address (outside any policy's /32 on the gateway)."""
        return str(self.net.broadcast_address - 1)

    def node_ip(self, index: int) -> str:
        return str(self.net.network_address + FIRST_NODE_HOST + index)

    @property
    def max_nodes(self) -> int:
        return self.net.num_addresses - FIRST_NODE_HOST - 3


def check_underlay(cidr: str, cluster_cidr: str) -> Underlay:
    try:
        net = ipaddress.IPv4Network(cidr)
        cluster = ipaddress.IPv4Network(cluster_cidr)
    except ValueError as e:
        raise NetnsError(f"bad underlay or cluster CIDR: {e}") from e
    routes.check_safe_cidr(cidr)
    if net.overlaps(cluster):
        raise NetnsError(f"underlay {net} overlaps the cluster CIDR {cluster}")
    if net.prefixlen > 26:
        raise NetnsError(f"underlay {net} is too small (use a /26 or larger)")
    return Underlay("", str(net))


def create_underlay(underlay: Underlay, cluster_cidr: str) -> None:
    create_netns(underlay.netns)
    plen = underlay.net.prefixlen
    try:
        with ipr_in(underlay.netns) as ipr:
            if not ipr.link_lookup(ifname=BRIDGE):
                ipr.link("add", ifname=BRIDGE, kind="bridge")
            idx = ipr.link_lookup(ifname=BRIDGE)[0]
            for addr in (underlay.gateway, underlay.world_ip):
                try:
                    ipr.addr("add", index=idx, address=addr, prefixlen=plen)
                except NetlinkError as e:
                    if e.code != 17:   # EEXIST: created by an earlier attempt
                        raise
            ipr.link("set", index=idx, state="up")
    except NetlinkError as e:
        raise NetnsError(f"cannot set up the underlay bridge in {underlay.netns}: {e}") from e
    routes.ensure_unreachable(cluster_cidr, underlay.netns)


def attach_node(underlay: Underlay, index: int, node_netns: str) -> str:
    """Create the node namespace and wire it to the bridge; returns the node IP."""
    create_netns(node_netns, forwarding=True)
    host_side, tmp = f"n{index}", f"n{index}peer"
    ip = underlay.node_ip(index)
    try:
        with ipr_in(underlay.netns) as u, ipr_in(node_netns) as n:
            if not n.link_lookup(ifname="eth0"):
                for stale in (host_side, tmp):
                    for i in u.link_lookup(ifname=stale):
                        u.link("del", index=i)
                u.link("add", ifname=host_side, kind="veth", peer={"ifname": tmp})
                fd = os.open(netns_path(node_netns), os.O_RDONLY)
                try:
                    u.link("set", index=u.link_lookup(ifname=tmp)[0], net_ns_fd=fd)
                finally:
                    os.close(fd)
                n.link("set", index=n.link_lookup(ifname=tmp)[0], ifname="eth0")
            hidx = u.link_lookup(ifname=host_side)[0]
            u.link("set", index=hidx, master=u.link_lookup(ifname=BRIDGE)[0], state="up")
            eth0 = n.link_lookup(ifname="eth0")[0]
            if not any(a.get("IFA_ADDRESS") == ip for a in n.get_addr(index=eth0)):
                n.addr("add", index=eth0, address=ip, prefixlen=underlay.net.prefixlen)
            n.link("set", index=eth0, state="up")
    except NetlinkError as e:
        raise NetnsError(f"cannot wire node namespace {node_netns} to the underlay: {e}") \
            from e
    return ip


def sync_pod_routes(underlay: Underlay, wanted: dict[str, str]) -> None:
    """Make the underlay route exactly ``wanted`` (pod CIDR → node IP) toward pods."""
    current = {dst: gw for dst, gw, _ in routes.routes(underlay.netns)
               if gw and ipaddress.IPv4Address(gw) in underlay.net}
    for cidr, via in wanted.items():
        if current.get(cidr) != via:
            routes.replace_route(cidr, via, underlay.netns)
    for cidr in current.keys() - wanted.keys():
        routes.delete_route(cidr, underlay.netns)
