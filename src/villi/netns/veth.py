"""The veth pair that connects a pod to its node.

Addressing (documented choice): the pod gets its IP as a /32 on ``eth0`` and reaches
everything through a gateway address, 169.254.1.1, that no interface owns. The pod
holds a route to the gateway on-link, a default route via it, and a *permanent
neighbour entry* mapping the gateway to the host-side veth's MAC: the pod never ARPs
for its gateway, so no proxy-ARP is needed and the node needs no address per pod.
The node side gets a /32 route to the pod through the host veth; the node resolves
the pod's MAC by ordinary ARP, which the datapath lets through.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute  # noqa: F401 (type of ipr_in)
from pyroute2.netlink.exceptions import NetlinkError

from villi._nsenter import netns_path
from villi.errors import NetnsError
from villi.netns._ipr import ipr_in
from villi.netns.namespaces import set_sysctl

GATEWAY_IPV4 = "169.254.1.1"


@dataclass(frozen=True)
class PodLink:
    """What was built: both ends of the veth and their MACs."""

    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_ifname: str
    pod_ifindex: int
    pod_mac: str
    ipv4: str
    gateway: str = GATEWAY_IPV4


def _mac(ipr: IPRoute, index: int) -> str:
    return ipr.get_links(index)[0].get("address")


def create_pod_link(
    *,
    host_ifname: str,
    host_netns: str | None,
    pod_netns: str,
    pod_ifname: str,
    ipv4: str,
    mtu: int = 1500,
) -> PodLink:
    """Create the veth, move its pod end into ``pod_netns`` and configure both ends.

    Raises NetnsError and leaves nothing behind when any step fails.
    """
    if len(host_ifname) > 15:
        raise NetnsError(f"interface name {host_ifname!r} is longer than 15 characters")
    try:
        socket.inet_aton(ipv4)
    except OSError as e:
        raise NetnsError(f"{ipv4!r} is not an IPv4 address") from e
    try:
        with ipr_in(host_netns) as host, ipr_in(pod_netns) as pod:
            # The peer is created directly inside the pod's namespace under its final
            # name: moving a device between namespaces waits for an RCU grace period
            # (~16 ms here), creating it there does not (<1 ms).
            ns_fd = os.open(netns_path(pod_netns), os.O_RDONLY)
            try:
                host.link("add", ifname=host_ifname, kind="veth", mtu=mtu,
                          peer={"ifname": pod_ifname, "mtu": mtu, "net_ns_fd": ns_fd})
            finally:
                os.close(ns_fd)
            try:
                host_idx = host.link_lookup(ifname=host_ifname)[0]
                pod_idx = pod.link_lookup(ifname=pod_ifname)[0]
                host_mac = _mac(host, host_idx)
                pod_mac = _mac(pod, pod_idx)
                set_sysctl(host_netns, f"net/ipv6/conf/{host_ifname}/disable_ipv6", "1")
                host.link("set", index=host_idx, state="up")
                pod.link("set", index=1, state="up")
                pod.link("set", index=pod_idx, state="up")
                pod.addr("add", index=pod_idx, address=ipv4, prefixlen=32)
                pod.route("add", dst=f"{GATEWAY_IPV4}/32", oif=pod_idx, scope=253)
                pod.route("add", dst="0.0.0.0/0", gateway=GATEWAY_IPV4, oif=pod_idx)
                pod.neigh("add", dst=GATEWAY_IPV4, lladdr=host_mac, ifindex=pod_idx,
                          state=0x80)  # NUD_PERMANENT
                host.route("add", dst=f"{ipv4}/32", oif=host_idx, scope=253)
            except Exception:
                _delete_quietly(host, host_ifname)
                raise
    except NetlinkError as e:
        raise NetnsError(f"cannot set up veth {host_ifname} for {ipv4} in {pod_netns}: "
                         f"{e.args[1] if len(e.args) > 1 else e}") from e
    except OSError as e:
        raise NetnsError(f"cannot set up veth {host_ifname} in {pod_netns}: {e}") from e
    return PodLink(host_ifname, host_idx, host_mac, pod_ifname, pod_idx, pod_mac, ipv4)


def _delete_quietly(ipr: IPRoute, ifname: str) -> None:
    try:
        idx = ipr.link_lookup(ifname=ifname)
        if idx:
            ipr.link("del", index=idx[0])
    except NetlinkError:
        pass


def delete_link(ifname: str, netns: str | None = None) -> bool:
    """Delete a link (a veth takes its peer with it); False when it did not exist."""
    try:
        with ipr_in(netns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                return False
            ipr.link("del", index=idx[0])
            return True
    except FileNotFoundError:
        return False
    except NetlinkError as e:
        raise NetnsError(f"cannot delete {ifname}: {e}") from e


def link_info(ifname: str, netns: str | None = None) -> tuple[int, str] | None:
    """(ifindex, MAC) of a link, or None when it does not exist."""
    with ipr_in(netns) as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        return idx[0], _mac(ipr, idx[0])
