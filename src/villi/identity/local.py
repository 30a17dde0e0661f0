"""Node-local identities for CIDR prefixes (Cilium's local scope, ``1<<24 | n``).

CIDR identities only ever appear in this node's ipcache and policy maps, so they are
allocated in-process and never touch the kvstore. A prefix keeps its number for the
life of the process even after it is released: a later policy that names the prefix
again gets the same id, so map entries and flow logs stay stable across policy churn.
"""

from __future__ import annotations

import ipaddress

from villi.errors import IdentityError
from villi.identity.ids import IdentityID
from villi.identity.labels import LabelSet, cidr_labels
from villi.identity.reserved import LOCAL_IDENTITY_SCOPE, MAX_LOCAL_IDENTITY


class LocalIdentityAllocator:
    """Reference-counted, deterministic-per-process CIDR identities."""

    def __init__(self) -> None:
        self._ids: dict[str, IdentityID] = {}
        self._prefixes: dict[IdentityID, str] = {}
        self._refs: dict[str, int] = {}
        self._next = LOCAL_IDENTITY_SCOPE | 1

    @staticmethod
    def _normalize(prefix: str) -> str:
        return str(ipaddress.ip_network(prefix, strict=True))

    def acquire(self, prefix: str) -> tuple[IdentityID, bool]:
        """The identity of ``prefix`` and whether this call made it live (refcount 0→1)."""
        prefix = self._normalize(prefix)
        identity = self._ids.get(prefix)
        if identity is None:
            if self._next > MAX_LOCAL_IDENTITY:
                raise IdentityError("node-local identity space exhausted")
            identity = IdentityID(self._next)
            self._next += 1
            self._ids[prefix] = identity
            self._prefixes[identity] = prefix
        count = self._refs.get(prefix, 0)
        self._refs[prefix] = count + 1
        return identity, count == 0

    def release(self, prefix: str) -> tuple[IdentityID, bool]:
        """Drop one reference; returns the identity and whether it is no longer live."""
        prefix = self._normalize(prefix)
        count = self._refs.get(prefix, 0)
        if count <= 0:
            raise IdentityError(f"release of unreferenced CIDR identity {prefix}")
        if count == 1:
            del self._refs[prefix]
        else:
            self._refs[prefix] = count - 1
        return self._ids[prefix], count == 1

    def lookup(self, prefix: str) -> IdentityID | None:
        """The live identity of ``prefix``, or None."""
        prefix = self._normalize(prefix)
        return self._ids[prefix] if prefix in self._refs else None

    def prefix_of(self, identity: int) -> str | None:
        return self._prefixes.get(IdentityID(identity))

    def labels_of(self, identity: int) -> LabelSet | None:
        prefix = self._prefixes.get(IdentityID(identity))
        return cidr_labels(prefix) if prefix is not None else None

    def live(self) -> dict[str, IdentityID]:
        """Every referenced prefix and its identity (what the ipcache must hold)."""
        return {p: self._ids[p] for p in self._refs}
