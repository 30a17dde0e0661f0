"""The simulated cloud's "hardware": attaching an interface makes a NIC appear.

On a real provider, attaching a network interface to an instance makes a new device
show up inside the VM, wired to the subnet's network. With ``villi cloud-sim
--plumb-links BRIDGE`` (the lab turns it on) the simulator does the same in the lab:
when an interface is attached to an instance tagged ``villi.io/netns=<netns>``, it
creates a veth pair whose one end joins ``BRIDGE`` in the simulator's own namespace
(the lab's underlay, standing in for the subnet's network) and whose other end appears
in the instance's namespace as ``eni<device index>``; detaching, deleting or
terminating removes it. The node's agent configures the device (address, routes).

Only lab namespaces are ever touched: the simulator runs inside the underlay namespace
and moves the peer straight into the node namespace named by the tag.
"""

from __future__ import annotations

import logging
import os

from pyroute2.netlink.exceptions import NetlinkError

from villi._nsenter import netns_path
from villi.netns._ipr import ipr_in

log = logging.getLogger(__name__)

NETNS_TAG = "villi.io/netns"


def _host_name(eni_id: str) -> str:
    """``ve<last 11 chars of the id>``: unique per interface, within IFNAMSIZ (15)."""
    return "ve" + eni_id.replace("-", "")[-11:]


class LinkPlumber:
    def __init__(self, bridge: str) -> None:
        self.bridge = bridge

    def attach(self, eni_id: str, netns: str, index: int) -> None:
        host, tmp = _host_name(eni_id), f"{_host_name(eni_id)}p"
        try:
            with ipr_in(None) as u:
                for stale in (host, tmp):
                    for i in u.link_lookup(ifname=stale):
                        u.link("del", index=i)
                u.link("add", ifname=host, kind="veth", peer={"ifname": tmp})
                fd = os.open(netns_path(netns), os.O_RDONLY)
                try:
                    u.link("set", index=u.link_lookup(ifname=tmp)[0], net_ns_fd=fd)
                finally:
                    os.close(fd)
                u.link("set", index=u.link_lookup(ifname=host)[0],
                       master=u.link_lookup(ifname=self.bridge)[0], state="up")
            with ipr_in(netns) as n:
                name = f"eni{index}"
                for stale in n.link_lookup(ifname=name):
                    n.link("del", index=stale)
                n.link("set", index=n.link_lookup(ifname=tmp)[0], ifname=name)
        except (NetlinkError, OSError, IndexError) as exc:
            log.warning("cannot plumb %s into %s as eni%d: %s", eni_id, netns, index, exc)

    def detach(self, eni_id: str) -> None:
        try:
            with ipr_in(None) as u:
                for i in u.link_lookup(ifname=_host_name(eni_id)):
                    u.link("del", index=i)  # the peer in the node namespace goes too
        except NetlinkError as exc:
            log.warning("cannot unplug %s: %s", eni_id, exc)
