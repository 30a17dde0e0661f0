"""ENI-style IPAM: Cilium's pool-sizing formulas and the node record (pure, no I/O).

In ENI mode pod IPs are secondary private IPs of cloud network interfaces attached to
the node's instance. Only the operator talks to the cloud; it keeps a *pool* of such
IPs per node and publishes it in the node's ENI record; the agent hands pod IPs out of
that pool and reports which ones are used. The sizes follow Cilium's operator
(``pkg/ipam/node.go``):

* ``needed = max(pre_allocate - (available - used), min_allocate - available)``, capped
  so that ``available + needed <= max_allocate`` (0: no cap), never below 0;
* one allocation asks for ``min(free on subnet, room on interface,
  needed + max_above_watermark + surge)`` where ``surge = pending pods - needed`` when
  more pods wait than the watermark would provide (Cilium's surge allocation);
* excess: with ``upper = min_allocate + max_above_watermark``, nothing while
  ``available <= upper``; ``available - upper`` while still inside the bootstrap
  allocation (``used <= upper`` and ``used + pre_allocate <= upper``); else
  ``available - used - pre_allocate - max_above_watermark`` (Cilium's code; releasing
  more would drop the free IPs under the pre-allocation watermark and allocate them
  right back).

Keys::

    villi/state/ipam/v1/eni/<node>         -> ENIRecord JSON    (operator, no lease)
    villi/state/ipam/v1/eni-status/<node>  -> ENIAgentStatus    (agent, under its lease)

The release handshake (Cilium's ``release-ips`` states): the operator marks an IP it
wants to give back ``marked``; the agent answers ``ready-for-release`` if no pod holds
it (and from then on never hands it out) or ``do-not-release`` if one does; only after
``ready-for-release`` does the operator unassign it from the interface.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from villi.errors import IPAMError
from villi.ipam.keys import IPAM_PREFIX, check_node_name

ENI_PREFIX = IPAM_PREFIX + "eni/"
ENI_STATUS_PREFIX = IPAM_PREFIX + "eni-status/"

#: Release handshake states.
MARKED = "marked"
READY_FOR_RELEASE = "ready-for-release"
DO_NOT_RELEASE = "do-not-release"


def eni_key(node: str) -> str:
    return ENI_PREFIX + check_node_name(node)


def eni_status_key(node: str) -> str:
    return ENI_STATUS_PREFIX + check_node_name(node)


@dataclass(frozen=True, slots=True)
class PoolParams:
    """Cilium's per-node pool parameters (``spec.ipam.*``), with its defaults."""

    pre_allocate: int = 8
    min_allocate: int = 0
    max_allocate: int = 0
    max_above_watermark: int = 0

    def __post_init__(self) -> None:
        for name in ("pre_allocate", "min_allocate", "max_allocate", "max_above_watermark"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0")
        if self.max_allocate and self.max_allocate < self.min_allocate:
            raise ValueError("max-allocate must be >= min-allocate")


def needed_ips(p: PoolParams, available: int, used: int) -> int:
    """How many IPs the pool lacks (Cilium's ``calculateNeededIPs``)."""
    needed = p.pre_allocate - (available - used)
    if p.min_allocate > 0:
        needed = max(needed, p.min_allocate - available)
    if p.max_allocate > 0 and available + needed > p.max_allocate:
        needed = p.max_allocate - available
    return max(needed, 0)


def excess_ips(p: PoolParams, available: int, used: int) -> int:
    """How many IPs the pool holds beyond need (Cilium's ``calculateExcessIPs``)."""
    upper = p.min_allocate + p.max_above_watermark
    if available <= upper:
        return 0
    if used <= upper and used + p.pre_allocate <= upper:
        excess = available - upper
    else:
        excess = available - used - p.pre_allocate - p.max_above_watermark
    return max(excess, 0)


def surge(needed: int, pending: int) -> int:
    """Extra IPs when more pods wait for an IP than ``needed`` would provide."""
    return pending - needed if pending > needed else 0


def allocation_size(p: PoolParams, needed: int, pending: int, *, room_on_interface: int,
                    free_on_subnet: int) -> int:
    """IPs to request in one operation (Cilium: ``min(AvailableOnSubnet,
    min(AvailableOnENI, Needed + MaxAboveWatermark + surge))``)."""
    want = needed + p.max_above_watermark + surge(needed, pending)
    return max(min(free_on_subnet, room_on_interface, want), 0)


@dataclass(frozen=True, slots=True)
class ENIInterface:
    """One interface of the node's instance as the operator last saw it."""

    id: str
    index: int
    subnet: str
    primary_ip: IPv4Address
    ips: tuple[IPv4Address, ...]  # secondary IPs: the pod pool
    cidr: str = ""  # the subnet's CIDR: the interface's on-link network

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "index": self.index, "subnet": self.subnet,
                "cidr": self.cidr, "primaryIP": str(self.primary_ip),
                "ips": [str(a) for a in self.ips]}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> ENIInterface:
        try:
            return cls(str(doc["id"]), int(doc["index"]), str(doc["subnet"]),
                       IPv4Address(doc["primaryIP"]),
                       tuple(IPv4Address(a) for a in doc.get("ips") or []),
                       str(doc.get("cidr") or ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise IPAMError(f"{where}: invalid interface {doc!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class ENIRecord:
    """What the operator publishes per node (Cilium's CiliumNode ``spec.ipam.pool`` +
    ``status.eni.enis`` + ``status.ipam.release-ips``).

    ``release`` maps IPs the operator wants back to :data:`MARKED`; ``attachable`` is
    how many more pod IPs the operator could still get within the instance type's limits
    (free interface slots and room on existing interfaces), which with the free IPs of
    the pool makes the node's allocatable figure.
    """

    node: str
    instance_id: str
    instance_type: str
    max_interfaces: int
    ips_per_interface: int
    interfaces: tuple[ENIInterface, ...] = ()
    release: Mapping[str, str] = field(default_factory=dict)
    attachable: int = 0
    needed: int = 0
    excess: int = 0
    error: str = ""

    def pool(self) -> dict[IPv4Address, str]:
        """Pod IP -> interface id."""
        return {ip: e.id for e in self.interfaces for ip in e.ips}

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "instanceID": self.instance_id,
                "instanceType": self.instance_type,
                "limits": {"maxInterfaces": self.max_interfaces,
                           "ipsPerInterface": self.ips_per_interface},
                "interfaces": [e.to_json() for e in self.interfaces],
                "release": dict(sorted(self.release.items())),
                "attachable": self.attachable,
                "status": {"neededIPs": self.needed, "excessIPs": self.excess,
                           "error": self.error}}

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, *, key: str = "") -> ENIRecord:
        where = key or "ENI record"
        try:
            doc = json.loads(raw)
            limits = doc["limits"]
            status = doc.get("status") or {}
            release = doc.get("release") or {}
            if not isinstance(release, dict):
                raise TypeError("release must be an object")
            return cls(
                str(doc["node"]), str(doc["instanceID"]), str(doc["instanceType"]),
                int(limits["maxInterfaces"]), int(limits["ipsPerInterface"]),
                tuple(ENIInterface.from_json(e, where) for e in doc.get("interfaces") or []),
                {str(k): str(v) for k, v in release.items()}, int(doc.get("attachable", 0)),
                int(status.get("neededIPs", 0)), int(status.get("excessIPs", 0)),
                str(status.get("error", "")))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                ValueError) as exc:
            raise IPAMError(f"{where}: malformed ENI record: {exc}") from None


@dataclass(frozen=True, slots=True)
class ENIAgentStatus:
    """What the agent reports (Cilium's ``status.ipam.used`` and its answers to the
    release handshake); ``pending`` counts pod IP requests refused for lack of IPs in
    the last report interval, which drives the operator's surge allocation."""

    used: Mapping[str, str] = field(default_factory=dict)  # ip -> owner
    release: Mapping[str, str] = field(default_factory=dict)  # ip -> ack state
    pending: int = 0

    def encode(self) -> bytes:
        return json.dumps({"used": dict(sorted(self.used.items())),
                           "release": dict(sorted(self.release.items())),
                           "pending": self.pending}, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, *, key: str = "") -> ENIAgentStatus:
        where = key or "ENI agent status"
        try:
            doc = json.loads(raw)
            used, release = doc.get("used", {}), doc.get("release", {})
            if not isinstance(used, dict) or not isinstance(release, dict):
                raise TypeError("used and release must be objects")
            return cls({str(k): str(v) for k, v in used.items()},
                       {str(k): str(v) for k, v in release.items()}, int(doc.get("pending", 0)))
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError,
                AttributeError) as exc:
            raise IPAMError(f"{where}: malformed ENI agent status: {exc}") from None
