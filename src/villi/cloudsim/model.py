"""The simulated cloud's state and its API operations, without HTTP.

This is a *simulator* of an EC2-like provider, just enough to exercise ENI-style IPAM:
instance types limit how many network interfaces an instance can hold and how many
private IPs each interface can carry; subnets hand out addresses from their CIDR and
run out; interfaces are created in a subnet, attached to an instance at a device index,
given secondary IPs, detached and deleted. Every operation either applies completely or
raises :class:`SimError` with a provider-style error code and changes nothing.

Eventual consistency: a new interface becomes visible to ``DescribeNetworkInterfaces``
only ``consistency_delay_s`` after its creation (operations naming it by id work at
once), which is what makes a real operator re-list after a change instead of trusting a
single answer.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

Clock = Callable[[], float]

#: Largest page ``DescribeNetworkInterfaces`` returns (EC2: 1000).
MAX_PAGE = 1000
DEFAULT_PAGE = 1000


class SimError(Exception):
    """A provider-style API error: ``code`` like EC2's (``InvalidParameterValue``), an
    HTTP status, and a message saying what is wrong."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class InstanceType:
    """Limits of an instance type: interfaces per instance, private IPs per interface
    (the primary IP included, as on EC2)."""

    name: str
    max_interfaces: int
    ips_per_interface: int

    def to_json(self) -> dict[str, Any]:
        return {"InstanceType": self.name, "MaxInterfaces": self.max_interfaces,
                "IPv4AddressesPerInterface": self.ips_per_interface}


@dataclass(slots=True)
class Subnet:
    id: str
    cidr: IPv4Network
    tags: dict[str, str] = field(default_factory=dict)
    used: set[IPv4Address] = field(default_factory=set)

    @property
    def available(self) -> int:
        # EC2 reserves the first four addresses and the last one of every subnet.
        return max(self.cidr.num_addresses - 5 - len(self.used), 0)

    def take(self, count: int) -> list[IPv4Address]:
        """``count`` free addresses (lowest first), or SimError with nothing taken."""
        if count > self.available:
            raise SimError("InsufficientFreeAddressesInSubnet",
                           f"subnet {self.id} has {self.available} free addresses, "
                           f"{count} requested")
        out: list[IPv4Address] = []
        hosts = self.cidr.hosts()
        for addr in itertools.islice(hosts, 3, None):  # .1-.3 reserved, like EC2
            if addr not in self.used:
                out.append(addr)
                if len(out) == count:
                    break
        self.used.update(out)
        return out

    def give_back(self, addrs: Iterable[IPv4Address]) -> None:
        self.used.difference_update(addrs)

    def to_json(self) -> dict[str, Any]:
        return {"SubnetId": self.id, "CidrBlock": str(self.cidr),
                "AvailableIpAddressCount": self.available,
                "Tags": [{"Key": k, "Value": v} for k, v in sorted(self.tags.items())]}


@dataclass(slots=True)
class Interface:
    id: str
    subnet_id: str
    primary_ip: IPv4Address
    description: str
    tags: dict[str, str]
    created_at: float
    secondary_ips: list[IPv4Address] = field(default_factory=list)
    instance_id: str | None = None
    device_index: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "NetworkInterfaceId": self.id,
            "SubnetId": self.subnet_id,
            "Description": self.description,
            "Status": "in-use" if self.instance_id else "available",
            "PrivateIpAddress": str(self.primary_ip),
            "PrivateIpAddresses": [{"PrivateIpAddress": str(self.primary_ip), "Primary": True}]
            + [{"PrivateIpAddress": str(a), "Primary": False} for a in self.secondary_ips],
            "TagSet": [{"Key": k, "Value": v} for k, v in sorted(self.tags.items())],
        }
        if self.instance_id is not None:
            doc["Attachment"] = {"InstanceId": self.instance_id,
                                 "DeviceIndex": self.device_index}
        return doc


@dataclass(slots=True)
class Instance:
    id: str
    type: InstanceType
    subnet_id: str
    tags: dict[str, str]
    interfaces: dict[int, str] = field(default_factory=dict)  # device index -> id

    def to_json(self) -> dict[str, Any]:
        return {"InstanceId": self.id, "InstanceType": self.type.name,
                "SubnetId": self.subnet_id,
                "NetworkInterfaces": [{"DeviceIndex": i, "NetworkInterfaceId": e}
                                      for i, e in sorted(self.interfaces.items())],
                "Tags": [{"Key": k, "Value": v} for k, v in sorted(self.tags.items())]}


def _str(params: Mapping[str, Any], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise SimError("MissingParameter", f"{name} must be a non-empty string")
    return value


def _int(params: Mapping[str, Any], name: str, default: int | None = None,
         low: int = 0, high: int = 1 << 20) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SimError("InvalidParameterValue",
                       f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _str_list(params: Mapping[str, Any], name: str) -> list[str] | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SimError("InvalidParameterValue", f"{name} must be a list of strings")
    return value


def _tags(params: Mapping[str, Any], name: str = "Tags") -> dict[str, str]:
    value = params.get(name) or {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SimError("InvalidParameterValue", f"{name} must map strings to strings")
    return dict(value)


class Cloud:
    """All simulated resources; one method per API action, named like the action.

    ``consistency_delay_s`` hides new interfaces from Describe for that long; ``clock``
    is injectable for tests.
    """

    def __init__(self, *, consistency_delay_s: float = 0.0, clock: Clock = time.monotonic
                 ) -> None:
        self.consistency_delay_s = consistency_delay_s
        self.clock = clock
        self.instance_types: dict[str, InstanceType] = {}
        self.subnets: dict[str, Subnet] = {}
        self.instances: dict[str, Instance] = {}
        self.interfaces: dict[str, Interface] = {}
        self._ids = itertools.count(1)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):08x}"

    # -- set-up (the lab's "console"): types, subnets, instances ------------------------

    def add_instance_type(self, name: str, max_interfaces: int, ips_per_interface: int
                          ) -> InstanceType:
        if max_interfaces < 1 or ips_per_interface < 1:
            raise SimError("InvalidParameterValue",
                           f"instance type {name}: limits must be >= 1")
        itype = InstanceType(name, max_interfaces, ips_per_interface)
        self.instance_types[name] = itype
        return itype

    def add_subnet(self, cidr: str, *, subnet_id: str | None = None,
                   tags: Mapping[str, str] | None = None) -> Subnet:
        try:
            net = IPv4Network(cidr, strict=True)
        except ValueError as exc:
            raise SimError("InvalidParameterValue", f"subnet CIDR {cidr!r}: {exc}") from None
        if net.prefixlen > 28:
            raise SimError("InvalidParameterValue", f"subnet {cidr} is smaller than /28")
        for other in self.subnets.values():
            if other.cidr.overlaps(net):
                raise SimError("InvalidSubnet.Conflict",
                               f"{cidr} overlaps {other.id} ({other.cidr})")
        sid = subnet_id or self._new_id("subnet")
        if sid in self.subnets:
            raise SimError("InvalidSubnet.Duplicate", f"subnet {sid} exists")
        subnet = Subnet(sid, net, dict(tags or {}))
        self.subnets[sid] = subnet
        return subnet

    def RunInstances(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: N802
        """Launch one instance with its primary interface (device index 0)."""
        itype = self._instance_type(_str(params, "InstanceType"))
        subnet = self._subnet(_str(params, "SubnetId"))
        tags = _tags(params)
        (ip,) = subnet.take(1)
        iid = self._new_id("i")
        eni = Interface(self._new_id("eni"), subnet.id, ip, "primary network interface",
                        {}, self.clock() - self.consistency_delay_s, instance_id=iid,
                        device_index=0)
        self.interfaces[eni.id] = eni
        inst = Instance(iid, itype, subnet.id, tags, {0: eni.id})
        self.instances[iid] = inst
        return {"Instance": inst.to_json()}

    def TerminateInstances(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: N802
        """The primary interface goes with the instance; the others are detached and
        stay (``available``), as EC2 does without delete-on-termination: that is what
        the operator's garbage collection is for."""
        ids = _str_list(params, "InstanceIds") or []
        for iid in ids:
            self._instance(iid)
        for iid in ids:
            inst = self.instances.pop(iid)
            for index, eid in inst.interfaces.items():
                eni = self.interfaces[eid]
                if index == 0:
                    self._free_interface(eni)
                else:
                    eni.instance_id = eni.device_index = None
        return {"TerminatingInstances": ids}

    # -- read -------------------------------------------------------------------------

    def DescribeInstanceTypes(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: N802
        return {"InstanceTypes": [t.to_json() for t in self.instance_types.values()]}

    def DescribeSubnets(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: N802
        ids = _str_list(params, "SubnetIds")
        subnets = [self._subnet(s) for s in ids] if ids else list(self.subnets.values())
        return {"Subnets": [s.to_json() for s in subnets]}

    def DescribeInstances(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: N802
        ids = _str_list(params, "InstanceIds")
        tags = _tags(params, "TagFilter")
        found = [self._instance(i) for i in ids] if ids else list(self.instances.values())
        found = [i for i in found if all(i.tags.get(k) == v for k, v in tags.items())]
        return {"Instances": [i.to_json() for i in found]}

    def DescribeNetworkInterfaces(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: N802
        """Interfaces visible now, filtered by ``SubnetIds``, ``InstanceIds`` and
        ``TagFilter`` (all optional, AND), ``MaxResults`` per page, resumed with the
        ``NextToken`` of the previous page."""
        subnets = _str_list(params, "SubnetIds")
        instances = _str_list(params, "InstanceIds")
        tags = _tags(params, "TagFilter")
        page = _int(params, "MaxResults", DEFAULT_PAGE, 5, MAX_PAGE)
        token = params.get("NextToken") or ""
        if not isinstance(token, str):
            raise SimError("InvalidParameterValue", "NextToken must be a string")
        visible_before = self.clock() - self.consistency_delay_s
        matches = sorted(
            (e for e in self.interfaces.values()
             if e.created_at <= visible_before
             and (subnets is None or e.subnet_id in subnets)
             and (instances is None or e.instance_id in instances)
             and all(e.tags.get(k) == v for k, v in tags.items())),
            key=lambda e: e.id)
        if token:
            matches = [e for e in matches if e.id > token]
        out = matches[:page]
        doc: dict[str, Any] = {"NetworkInterfaces": [e.to_json() for e in out]}
        if len(matches) > page:
            doc["NextToken"] = out[-1].id
        return doc

    # -- mutate -----------------------------------------------------------------------

    def CreateNetworkInterface(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: N802
        subnet = self._subnet(_str(params, "SubnetId"))
        extra = _int(params, "SecondaryPrivateIpAddressCount", 0)
        description = params.get("Description") or ""
        if not isinstance(description, str):
            raise SimError("InvalidParameterValue", "Description must be a string")
        tags = _tags(params)
        addrs = subnet.take(1 + extra)
        eni = Interface(self._new_id("eni"), subnet.id, addrs[0], description, tags,
                        self.clock(), addrs[1:])
        self.interfaces[eni.id] = eni
        return {"NetworkInterface": eni.to_json()}

    def AttachNetworkInterface(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: N802
        eni = self._interface(_str(params, "NetworkInterfaceId"))
        inst = self._instance(_str(params, "InstanceId"))
        index = _int(params, "DeviceIndex", None, 1, 63)
        if eni.instance_id is not None:
            raise SimError("InvalidNetworkInterface.InUse",
                           f"{eni.id} is attached to {eni.instance_id}")
        if len(inst.interfaces) >= inst.type.max_interfaces:
            raise SimError("AttachmentLimitExceeded",
                           f"{inst.id} ({inst.type.name}) holds at most "
                           f"{inst.type.max_interfaces} interfaces")
        if index in inst.interfaces:
            raise SimError("InvalidParameterValue",
                           f"device index {index} of {inst.id} is in use")
        if len(eni.secondary_ips) + 1 > inst.type.ips_per_interface:
            raise SimError("PrivateIpAddressLimitExceeded",
                           f"{eni.id} has more IPs than {inst.type.name} allows")
        inst.interfaces[index] = eni.id
        eni.instance_id, eni.device_index = inst.id, index
        return {"AttachmentId": f"attach-{eni.id}"}

    def DetachNetworkInterface(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: N802
        eni = self._interface(_str(params, "NetworkInterfaceId"))
        if eni.instance_id is None:
            raise SimError("IncorrectState", f"{eni.id} is not attached")
        if eni.device_index == 0:
            raise SimError("OperationNotPermitted",
                           f"{eni.id} is the primary interface of {eni.instance_id}")
        inst = self.instances.get(eni.instance_id)
        if inst is not None and eni.device_index is not None:
            inst.interfaces.pop(eni.device_index, None)
        eni.instance_id = eni.device_index = None
        return {}

    def DeleteNetworkInterface(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: N802
        eni = self._interface(_str(params, "NetworkInterfaceId"))
        if eni.instance_id is not None:
            raise SimError("InvalidNetworkInterface.InUse",
                           f"{eni.id} is attached to {eni.instance_id}; detach it first")
        self._free_interface(eni)
        return {}

    def AssignPrivateIpAddresses(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: N802
        eni = self._interface(_str(params, "NetworkInterfaceId"))
        count = _int(params, "SecondaryPrivateIpAddressCount", None, 1, 1000)
        if eni.instance_id is not None:
            limit = self.instances[eni.instance_id].type.ips_per_interface
            if 1 + len(eni.secondary_ips) + count > limit:
                raise SimError("PrivateIpAddressLimitExceeded",
                               f"{eni.id} has {1 + len(eni.secondary_ips)} of {limit} IPs, "
                               f"{count} more requested")
        addrs = self.subnets[eni.subnet_id].take(count)
        eni.secondary_ips.extend(addrs)
        return {"AssignedPrivateIpAddresses": [str(a) for a in addrs]}

    def UnassignPrivateIpAddresses(self, params: Mapping[str, Any]) -> dict[str, Any]:  # noqa: N802
        eni = self._interface(_str(params, "NetworkInterfaceId"))
        raw = _str_list(params, "PrivateIpAddresses") or []
        try:
            addrs = [ipaddress.IPv4Address(a) for a in raw]
        except ValueError as exc:
            raise SimError("InvalidParameterValue", str(exc)) from None
        missing = [str(a) for a in addrs if a not in eni.secondary_ips]
        if missing:
            raise SimError("InvalidParameterValue",
                           f"{', '.join(missing)} not secondary IPs of {eni.id}")
        eni.secondary_ips = [a for a in eni.secondary_ips if a not in addrs]
        self.subnets[eni.subnet_id].give_back(addrs)
        return {}

    # -- helpers ----------------------------------------------------------------------

    def _free_interface(self, eni: Interface) -> None:
        self.subnets[eni.subnet_id].give_back([eni.primary_ip, *eni.secondary_ips])
        del self.interfaces[eni.id]

    def _instance_type(self, name: str) -> InstanceType:
        try:
            return self.instance_types[name]
        except KeyError:
            raise SimError("InvalidInstanceType", f"unknown instance type {name!r}") from None

    def _subnet(self, sid: str) -> Subnet:
        try:
            return self.subnets[sid]
        except KeyError:
            raise SimError("InvalidSubnetID.NotFound", f"no subnet {sid!r}") from None

    def _instance(self, iid: str) -> Instance:
        try:
            return self.instances[iid]
        except KeyError:
            raise SimError("InvalidInstanceID.NotFound", f"no instance {iid!r}") from None

    def _interface(self, eid: str) -> Interface:
        try:
            return self.interfaces[eid]
        except KeyError:
            raise SimError("InvalidNetworkInterfaceID.NotFound",
                           f"no network interface {eid!r}") from None


#: Actions callable over HTTP (RunInstances/TerminateInstances play the console's part).
ACTIONS = (
    "DescribeInstanceTypes", "DescribeSubnets", "DescribeInstances",
    "DescribeNetworkInterfaces", "CreateNetworkInterface", "AttachNetworkInterface",
    "DetachNetworkInterface", "DeleteNetworkInterface", "AssignPrivateIpAddresses",
    "UnassignPrivateIpAddresses", "RunInstances", "TerminateInstances",
)
