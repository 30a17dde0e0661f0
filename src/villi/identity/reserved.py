"""Reserved identities, numbered as in Cilium so users' knowledge (and Hubble output
they have seen) carries over: ``ID:2`` is world everywhere.

Reserved identities are never allocated in the kvstore; every node knows them.
"""

from __future__ import annotations

import enum

from villi.identity.ids import IdentityID
from villi.identity.labels import SOURCE_RESERVED, Label, LabelSet

#: First identity the cluster-wide allocator hands out (Cilium's MinimalNumericIdentity).
MIN_CLUSTER_IDENTITY = 256
#: Last cluster-wide identity for cluster id 0 (Cilium: 16 bits with 255 clusters).
MAX_CLUSTER_IDENTITY = 65535
#: Scope bit of node-local identities (CIDR identities), Cilium's IdentityScopeLocal.
LOCAL_IDENTITY_SCOPE = 1 << 24
MAX_LOCAL_IDENTITY = LOCAL_IDENTITY_SCOPE | 0xFFFFFF


class ReservedIdentity(enum.IntEnum):
    """Cilium's reserved identity numbers (``pkg/identity/numericidentity.go``)."""

    UNKNOWN = 0
    HOST = 1
    WORLD = 2
    UNMANAGED = 3
    HEALTH = 4
    INIT = 5
    REMOTE_NODE = 6
    KUBE_APISERVER = 7
    INGRESS = 8

    @property
    def label_name(self) -> str:
        """The ``reserved:<name>`` label key (``remote-node``, ``kube-apiserver``, …)."""
        return self.name.lower().replace("_", "-")

    @property
    def labels(self) -> LabelSet:
        return RESERVED_LABELS[self]


RESERVED_LABELS: dict[ReservedIdentity, LabelSet] = {
    rid: LabelSet((Label(SOURCE_RESERVED, rid.name.lower().replace("_", "-"), ""),))
    for rid in ReservedIdentity
    if rid is not ReservedIdentity.UNKNOWN
}

_BY_LABELS = {labels: IdentityID(int(rid)) for rid, labels in RESERVED_LABELS.items()}


def reserved_identities() -> dict[IdentityID, LabelSet]:
    """Every reserved identity (except 0) with its labels."""
    return {IdentityID(int(rid)): labels for rid, labels in RESERVED_LABELS.items()}


def reserved_identity_for(labels: LabelSet) -> IdentityID | None:
    """The reserved identity whose labels are exactly ``labels``, if any."""
    return _BY_LABELS.get(labels)


def is_reserved(identity: int) -> bool:
    return 0 < identity < MIN_CLUSTER_IDENTITY


def is_local(identity: int) -> bool:
    """True for node-local (CIDR) identities, which never leave this node."""
    return identity & 0xFF000000 == LOCAL_IDENTITY_SCOPE
