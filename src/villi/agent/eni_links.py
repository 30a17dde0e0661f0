"""ENI mode's routing on the node: pods send through the interface that owns their IP.

For every interface in the node's ENI record whose device ``eni<index>`` exists in
the node namespace (the cloud attached it; in the lab ``villi cloud-sim
--plumb-links`` creates it), the agent:

* brings it up with the interface's primary IP on the subnet's prefix, ``rp_filter``
  off (replies from other nodes' pods arrive here while the main table routes those
  pods via their node IP), and routes the subnet on-link through it in table
  ``100 + index``;
* for each pod IP handed out from that interface: ``ip rule from <pod IP> lookup
  100 + index`` (priority 1000), so the pod's traffic to the subnet leaves through its
  interface, and a proxy-ARP entry for the pod IP on that device only, so the subnet
  delivers traffic for the pod to that interface (as the provider's fabric would).

Cilium's ENI mode does the same with per-ENI routing tables and rules. Everything
happens in the agent's own (node) namespace; the agent refuses the root namespace.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_PROXY

from villi.ipam.eni import ENIRecord
from villi.netns import set_sysctl

log = logging.getLogger(__name__)

TABLE_BASE = 100
RULE_PRIORITY = 1000


class ENILinks:
    """Idempotent: :meth:`sync` brings the kernel to the wanted state and remembers it."""

    def __init__(self) -> None:
        # pyroute2's synchronous API refuses to run on a thread with a running event
        # loop: netlink work happens on this one thread (callers wait, a few ms)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="villi-eni-links")
        self._configured: dict[str, tuple[int, int]] = {}  # eni id -> (ifindex, table)
        self._pods: dict[str, tuple[int, int]] = {}        # pod ip -> (ifindex, table)

    def sync(self, record: ENIRecord | None, owners: Mapping[str, str]) -> None:
        if record is not None:
            self._thread.submit(self._sync, record, dict(owners)).result()

    def close(self) -> None:
        self._thread.shutdown(wait=True)

    def _sync(self, record: ENIRecord, owners: Mapping[str, str]) -> None:
        try:
            with IPRoute() as ipr:
                by_ip: dict[str, tuple[int, int]] = {}
                for e in record.interfaces:
                    where = self._configure(ipr, e.id, e.index, str(e.primary_ip), e.cidr)
                    if where is not None:
                        for addr in e.ips:
                            by_ip[str(addr)] = where
                wanted = {ip: by_ip[ip] for ip in owners if ip in by_ip}
                for ip, where in list(self._pods.items()):
                    if wanted.get(ip) != where:
                        self._unroute_pod(ipr, ip, where)
                for ip, where in wanted.items():
                    if self._pods.get(ip) != where:
                        self._route_pod(ipr, ip, where)
                gone = {e.id for e in record.interfaces}
                for eid in set(self._configured) - gone:
                    del self._configured[eid]  # the device went with the interface
        except NetlinkError as exc:
            log.warning("ENI routing: %s", exc)

    def _configure(self, ipr: IPRoute, eid: str, index: int, primary: str, cidr: str
                   ) -> tuple[int, int] | None:
        name = f"eni{index}"
        links = ipr.link_lookup(ifname=name)
        if not links or not cidr:
            return None
        ifindex, table = links[0], TABLE_BASE + index
        if self._configured.get(eid) == (ifindex, table):
            return ifindex, table
        net = ipaddress.IPv4Network(cidr)
        set_sysctl(None, f"net/ipv4/conf/{name}/rp_filter", "0")
        ipr.link("set", index=ifindex, state="up")
        if not any(a.get_attr("IFA_ADDRESS") == primary for a in ipr.get_addr(index=ifindex)):
            ipr.addr("add", index=ifindex, address=primary, prefixlen=net.prefixlen)
        ipr.route("replace", dst=str(net.network_address), dst_len=net.prefixlen,
                  oif=ifindex, table=table, scope=253)  # scope link
        self._configured[eid] = (ifindex, table)
        log.info("ENI %s is %s (%s/%d, table %d)", eid, name, primary, net.prefixlen, table)
        return ifindex, table

    def _route_pod(self, ipr: IPRoute, ip: str, where: tuple[int, int]) -> None:
        ifindex, table = where
        try:
            ipr.rule("add", table=table, priority=RULE_PRIORITY, src=ip, src_len=32)
        except NetlinkError as exc:
            if exc.code != 17:  # EEXIST
                raise
        try:
            ipr.neigh("add", dst=ip, ifindex=ifindex, flags=NTF_PROXY)
        except NetlinkError as exc:
            if exc.code != 17:
                raise
        self._pods[ip] = where

    def _unroute_pod(self, ipr: IPRoute, ip: str, where: tuple[int, int]) -> None:
        ifindex, table = where
        for call in (lambda: ipr.rule("del", table=table, priority=RULE_PRIORITY, src=ip,
                                      src_len=32),
                     lambda: ipr.neigh("del", dst=ip, ifindex=ifindex, flags=NTF_PROXY)):
            try:
                call()
            except NetlinkError as exc:
                if exc.code not in (2, 3):  # ENOENT/ESRCH: already gone
                    raise
        self._pods.pop(ip, None)
