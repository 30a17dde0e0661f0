"""The cluster CIDR cut into per-node subnets, and the ranges no pod may ever use.

Pure arithmetic (no store): the allocator numbers the node subnets ``0 ..
count - 1`` in address order, so "lowest free" is "smallest index not claimed", and a
claim of another size (left by an operator configured with another mask) blocks every
index it overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network

from villi.errors import IPAMError
from villi.ipam.keys import parse_cidr

DEFAULT_CLUSTER_CIDR = "10.64.0.0/10"
DEFAULT_NODE_MASK = 24
#: Ranges no pod CIDR may overlap: this machine's resolver lives in 10.255.0.0/16.
RESERVED_RANGES = (IPv4Network("10.255.0.0/16"),)


def validate_cluster_cidr(cidr: str | IPv4Network, node_mask: int) -> IPv4Network:
    """The cluster CIDR as a network; IPAMError when it or the node mask is unusable."""
    net = cidr if isinstance(cidr, IPv4Network) else parse_cidr(cidr)
    for reserved in RESERVED_RANGES:
        if net.overlaps(reserved):
            raise IPAMError(
                f"cluster CIDR {net} overlaps {reserved}, which is reserved (this machine's "
                f"DNS resolver lives there); choose a range outside it, e.g. "
                f"{DEFAULT_CLUSTER_CIDR} (10.64.0.0-10.127.255.255)")
    if not net.prefixlen <= node_mask <= 30:
        raise IPAMError(f"node mask /{node_mask} must be between the cluster CIDR's "
                        f"/{net.prefixlen} and /30")
    return net


@dataclass(frozen=True, slots=True)
class SubnetSpace:
    """``cluster`` cut into ``/node_mask`` subnets; validated on construction."""

    cluster: IPv4Network
    node_mask: int

    def __post_init__(self) -> None:
        validate_cluster_cidr(self.cluster, self.node_mask)

    @classmethod
    def parse(cls, cluster_cidr: str | IPv4Network, node_mask: int) -> SubnetSpace:
        return cls(validate_cluster_cidr(cluster_cidr, node_mask), node_mask)

    @property
    def count(self) -> int:
        return 1 << (self.node_mask - self.cluster.prefixlen)

    @property
    def _size(self) -> int:
        return 1 << (32 - self.node_mask)

    def subnet(self, index: int) -> IPv4Network:
        if not 0 <= index < self.count:
            raise IndexError(f"subnet {index} outside 0..{self.count - 1}")
        return IPv4Network((int(self.cluster.network_address) + index * self._size,
                            self.node_mask))

    def indices(self, cidr: IPv4Network) -> range:
        """Indices of the node subnets ``cidr`` overlaps (empty outside the cluster)."""
        if not cidr.overlaps(self.cluster):
            return range(0)
        base = int(self.cluster.network_address)
        lo = max(int(cidr.network_address), base)
        hi = min(int(cidr.broadcast_address), int(self.cluster.broadcast_address))
        return range((lo - base) // self._size, (hi - base) // self._size + 1)

    def reserved_indices(self) -> set[int]:
        """Subnets overlapping a reserved range (none for a validated cluster CIDR;
        kept as a second line of defence)."""
        return {i for r in RESERVED_RANGES for i in self.indices(r)}

    def assignable(self, cidr: IPv4Network) -> bool:
        """True for exactly one node subnet of this space outside reserved ranges (used
        to vet the CIDRs a node entry asks for)."""
        return (cidr.prefixlen == self.node_mask and cidr.subnet_of(self.cluster)
                and not any(cidr.overlaps(r) for r in RESERVED_RANGES))
