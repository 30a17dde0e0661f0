"""Cluster names, cluster ids and the identity range each cluster allocates from.

Cilium's layout (``pkg/identity/numericidentity.go``, ``pkg/clustermesh/types``): the
datapath carries 24 bits of identity; with at most 255 connected clusters the cluster
id takes bits 16–23 (shift 16), with 511 it takes bits 15–23 (shift 15, half as many
identities per cluster). Cluster *N* allocates in ``[N << shift, ((N + 1) << shift) - 1]``
except cluster 0, whose range starts above the reserved identities at 256. Because the
cluster id is recoverable from an identity, an identity that claims to come from a
remote cluster can be checked against that cluster's id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from villi.errors import VilliError

#: Cilium's ``MinimalNumericIdentity``: identities below are reserved.
MIN_IDENTITY = 256
#: The datapath carries 24 bits; bit 24 marks node-local (CIDR) identities.
IDENTITY_BITS = 24
MAX_CONNECTED_CLUSTERS = (255, 511)
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


class ClusterMeshError(VilliError):
    """A bad cluster name, id or mesh setting."""


def check_max_connected(max_connected: int) -> int:
    if max_connected not in MAX_CONNECTED_CLUSTERS:
        raise ClusterMeshError(f"--max-connected-clusters must be 255 or 511, not "
                               f"{max_connected}")
    return max_connected


def cluster_id_shift(max_connected: int = 255) -> int:
    """Bit position of the cluster id in an identity: 16 (255 clusters), 15 (511)."""
    bits = (check_max_connected(max_connected) + 1).bit_length() - 1
    return IDENTITY_BITS - bits


def check_cluster_id(cluster_id: int, max_connected: int = 255, *, allow_zero: bool = True
                     ) -> int:
    """A cluster id in 0..max (0 = not in a mesh)."""
    low = 0 if allow_zero else 1
    if not isinstance(cluster_id, int) or not low <= cluster_id <= max_connected:
        raise ClusterMeshError(f"cluster id must be between {low} and {max_connected}, "
                               f"not {cluster_id!r}")
    return cluster_id


def check_cluster_name(name: str) -> str:
    """A DNS label of at most 32 characters (Cilium's limit), lower case."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ClusterMeshError(f"invalid cluster name {name!r}: 1-32 characters of a-z, 0-9 "
                               "and '-', starting and ending with a letter or digit")
    return name


def identity_range(cluster_id: int, max_connected: int = 255) -> tuple[int, int]:
    """First and last identity cluster ``cluster_id`` allocates (both inclusive)."""
    check_cluster_id(cluster_id, max_connected)
    shift = cluster_id_shift(max_connected)
    low = max(MIN_IDENTITY, cluster_id << shift)
    return low, ((cluster_id + 1) << shift) - 1


def cluster_of_identity(identity: int, max_connected: int = 255) -> int:
    """The cluster id encoded in a (global, non-reserved) identity."""
    return (identity & ((1 << IDENTITY_BITS) - 1)) >> cluster_id_shift(max_connected)


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """One cluster of the mesh: its name, id and the mesh's size setting."""

    name: str
    id: int
    max_connected: int = 255

    def __post_init__(self) -> None:
        check_cluster_name(self.name)
        check_cluster_id(self.id, self.max_connected)

    @property
    def identity_range(self) -> tuple[int, int]:
        return identity_range(self.id, self.max_connected)

    def owns_identity(self, identity: int) -> bool:
        low, high = self.identity_range
        return low <= identity <= high

    def config(self) -> dict[str, object]:
        """The cluster-config record (Cilium's ``CiliumClusterConfig``)."""
        return {"name": self.name, "id": self.id,
                "capabilities": {"syncedCanaries": True,
                                 "maxConnectedClusters": self.max_connected}}

    @classmethod
    def from_config(cls, data: object) -> ClusterInfo:
        """Parse a cluster-config record; ClusterMeshError names what is wrong."""
        if not isinstance(data, dict):
            raise ClusterMeshError("cluster config is not a JSON object")
        caps = data.get("capabilities") or {}
        if not isinstance(caps, dict):
            raise ClusterMeshError("cluster config: capabilities is not an object")
        return cls(str(data.get("name", "")), data.get("id"),  # type: ignore[arg-type]
                   caps.get("maxConnectedClusters", 255))


def parse_remote(spec: str) -> tuple[str, str]:
    """``NAME=URL`` of a ``--remote`` flag → (name, url)."""
    name, sep, url = spec.partition("=")
    if not sep or not url:
        raise ClusterMeshError(f"--remote {spec!r}: expected NAME=URL[,URL...]")
    return check_cluster_name(name.strip()), url.strip()
