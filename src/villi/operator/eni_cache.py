"""The operator's view of the cloud for ENI IPAM, and how it is refreshed.

One global cache of instance types, subnets, instances and network interfaces, as in
Cilium's operator. Refresh strategies (``--eni-resync``):

* ``per-subnet``: one paginated ``DescribeNetworkInterfaces`` per subnet (the old way;
  many calls when there are many subnets), and a full resync after every change;
* ``all``: one paginated Describe of every interface (cilium#22478: one listing instead
  of one per subnet), still a full resync after every change;
* ``incremental`` (default): after a change only the changed instance's interfaces are
  listed again (cilium#25619's ``InstanceSync``: 8,000 interfaces went from ~20 s to
  ~2 s), and a full ``all`` resync runs periodically (60 s).

Eventual consistency: a listing may not show an interface created a moment ago. The
cache applies every mutation's answer at once and keeps interfaces it created recently
(``visibility_grace_s``) when a listing lacks them, so a lagging Describe cannot make
the operator think an interface vanished (and create another).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # aiohttp's client only when a cache is actually built
    from villi.operator.cloud import CloudClient

log = logging.getLogger(__name__)

STRATEGIES = ("per-subnet", "all", "incremental")


@dataclass(slots=True)
class CachedInterface:
    id: str
    subnet: str
    primary_ip: IPv4Address
    ips: list[IPv4Address]
    instance_id: str | None
    index: int | None
    tags: dict[str, str]

    @classmethod
    def from_api(cls, doc: dict[str, Any]) -> CachedInterface:
        att = doc.get("Attachment") or {}
        secondary = [IPv4Address(a["PrivateIpAddress"])
                     for a in doc.get("PrivateIpAddresses") or [] if not a.get("Primary")]
        return cls(doc["NetworkInterfaceId"], doc["SubnetId"],
                   IPv4Address(doc["PrivateIpAddress"]), secondary,
                   att.get("InstanceId"), att.get("DeviceIndex"),
                   {t["Key"]: t["Value"] for t in doc.get("TagSet") or []})


@dataclass(slots=True)
class CachedInstance:
    id: str
    type: str
    subnet: str
    tags: dict[str, str]


@dataclass(slots=True)
class CachedSubnet:
    id: str
    cidr: str
    available: int


@dataclass(slots=True)
class InterfaceCache:
    """See the module docstring. ``resyncs`` counts full and per-instance refreshes."""

    cloud: CloudClient
    strategy: str = "incremental"
    visibility_grace_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    types: dict[str, tuple[int, int]] = field(default_factory=dict)  # max ifaces, ips/iface
    subnets: dict[str, CachedSubnet] = field(default_factory=dict)
    instances: dict[str, CachedInstance] = field(default_factory=dict)
    interfaces: dict[str, CachedInterface] = field(default_factory=dict)
    created: dict[str, float] = field(default_factory=dict)  # our new ids -> when
    full_resyncs: int = 0
    instance_resyncs: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown ENI resync strategy {self.strategy!r} "
                             f"(choose from {', '.join(STRATEGIES)})")

    # -- refresh ----------------------------------------------------------------------

    async def full_resync(self) -> None:
        """Everything again: types (once), subnets, instances, interfaces."""
        if not self.types:
            doc = await self.cloud.call("DescribeInstanceTypes")
            self.types = {t["InstanceType"]: (int(t["MaxInterfaces"]),
                                              int(t["IPv4AddressesPerInterface"]))
                          for t in doc.get("InstanceTypes") or []}
        await self._resync_subnets()
        doc = await self.cloud.call("DescribeInstances")
        self.instances = {
            i["InstanceId"]: CachedInstance(i["InstanceId"], i["InstanceType"], i["SubnetId"],
                                            {t["Key"]: t["Value"] for t in i.get("Tags") or []})
            for i in doc.get("Instances") or []}
        listed: list[dict[str, Any]] = []
        if self.strategy == "per-subnet":
            for sid in sorted(self.subnets):
                listed += await self.cloud.describe_all(
                    "DescribeNetworkInterfaces", "NetworkInterfaces", SubnetIds=[sid])
        else:
            listed = await self.cloud.describe_all("DescribeNetworkInterfaces",
                                                   "NetworkInterfaces")
        fresh = {d["NetworkInterfaceId"]: CachedInterface.from_api(d) for d in listed}
        self.interfaces = self._keep_recent(fresh, lambda e: True)
        self.full_resyncs += 1

    async def instance_resync(self, instance_id: str) -> None:
        """Only ``instance_id``'s interfaces (and the subnets' free counts)."""
        await self._resync_subnets()
        listed = await self.cloud.describe_all("DescribeNetworkInterfaces",
                                               "NetworkInterfaces", InstanceIds=[instance_id])
        fresh = {d["NetworkInterfaceId"]: CachedInterface.from_api(d) for d in listed}
        others = {k: v for k, v in self.interfaces.items() if v.instance_id != instance_id}
        mine_old = {k: v for k, v in self.interfaces.items() if v.instance_id == instance_id}
        kept = self._keep_recent(fresh, lambda e: e.id in mine_old, old=mine_old)
        self.interfaces = {**others, **kept}
        self.instance_resyncs += 1

    async def after_change(self, instance_id: str) -> None:
        """The refresh a strategy does after the operator changed ``instance_id``."""
        if self.strategy == "incremental":
            await self.instance_resync(instance_id)
        else:
            await self.full_resync()

    async def _resync_subnets(self) -> None:
        doc = await self.cloud.call("DescribeSubnets")
        self.subnets = {s["SubnetId"]: CachedSubnet(s["SubnetId"], s["CidrBlock"],
                                                    int(s["AvailableIpAddressCount"]))
                        for s in doc.get("Subnets") or []}

    def _keep_recent(self, fresh: dict[str, CachedInterface],
                     scope: Callable[[CachedInterface], bool],
                     old: dict[str, CachedInterface] | None = None
                     ) -> dict[str, CachedInterface]:
        now = self.clock()
        old = self.interfaces if old is None else old
        self.created = {k: t for k, t in self.created.items()
                        if now - t < self.visibility_grace_s and k not in fresh}
        for eid in self.created:
            if eid in old and eid not in fresh and scope(old[eid]):
                fresh[eid] = old[eid]  # created by us, not yet visible in Describe
        return fresh

    # -- mutations (answers applied to the cache at once) ------------------------------

    async def create_interface(self, subnet: str, count: int, description: str,
                               tags: dict[str, str]) -> CachedInterface:
        doc = await self.cloud.call("CreateNetworkInterface", SubnetId=subnet,
                                    SecondaryPrivateIpAddressCount=count,
                                    Description=description, Tags=tags)
        eni = CachedInterface.from_api(doc["NetworkInterface"])
        self.interfaces[eni.id] = eni
        self.created[eni.id] = self.clock()
        if subnet in self.subnets:
            self.subnets[subnet].available -= 1 + count
        return eni

    async def attach(self, eni: CachedInterface, instance_id: str, index: int) -> None:
        await self.cloud.call("AttachNetworkInterface", NetworkInterfaceId=eni.id,
                              InstanceId=instance_id, DeviceIndex=index)
        eni.instance_id, eni.index = instance_id, index

    async def detach(self, eni: CachedInterface) -> None:
        await self.cloud.call("DetachNetworkInterface", NetworkInterfaceId=eni.id)
        eni.instance_id = eni.index = None

    async def delete(self, eni: CachedInterface) -> None:
        await self.cloud.call("DeleteNetworkInterface", NetworkInterfaceId=eni.id)
        self.interfaces.pop(eni.id, None)
        self.created.pop(eni.id, None)

    async def assign(self, eni: CachedInterface, count: int) -> list[IPv4Address]:
        doc = await self.cloud.call("AssignPrivateIpAddresses", NetworkInterfaceId=eni.id,
                                    SecondaryPrivateIpAddressCount=count)
        got = [IPv4Address(a) for a in doc.get("AssignedPrivateIpAddresses") or []]
        eni.ips.extend(got)
        if eni.subnet in self.subnets:
            self.subnets[eni.subnet].available -= len(got)
        return got

    async def unassign(self, eni: CachedInterface, ips: list[IPv4Address]) -> None:
        await self.cloud.call("UnassignPrivateIpAddresses", NetworkInterfaceId=eni.id,
                              PrivateIpAddresses=[str(a) for a in ips])
        eni.ips = [a for a in eni.ips if a not in ips]

    # -- queries ----------------------------------------------------------------------

    def instance_of_node(self, node: str, tag: str) -> CachedInstance | None:
        for inst in self.instances.values():
            if inst.tags.get(tag) == node:
                return inst
        return None

    def interfaces_of(self, instance_id: str) -> list[CachedInterface]:
        return sorted((e for e in self.interfaces.values() if e.instance_id == instance_id),
                      key=lambda e: e.index if e.index is not None else -1)
