"""villi.identity — labels, reserved identities, allocation and the identity cache.

The public surface::

    IdentityID  (the numeric security identity, a NewType of int)       (ids)
    Label, LabelSet, parse_label, pod_identity_labels, cidr_labels     (labels)
    ReservedIdentity, reserved_identities(), reserved_identity_for()   (reserved)
    IdentityAllocator(store, node, lease=None)                          (allocator)
        await .allocate(labels) -> IdentityID; await .release(labels) -> bool
    IdentityGC(store, min_idle_runs=2).run_once(); collect_garbage(store) (operator)
    LocalIdentityAllocator  (node-local CIDR identities, 1<<24 | n)    (local)
    IdentityCache  (id <-> labels, listeners, .run(store) list+watch)   (cache)

Names are imported lazily (the allocator and cache pull in the kvstore interface).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Label": "labels", "LabelSet": "labels", "parse_label": "labels",
    "pod_identity_labels": "labels", "cidr_labels": "labels",
    "namespace_labels": "labels",
    "ReservedIdentity": "reserved", "reserved_identities": "reserved",
    "reserved_identity_for": "reserved", "MIN_CLUSTER_IDENTITY": "reserved",
    "IdentityAllocator": "allocator", "IdentityGC": "allocator",
    "collect_garbage": "allocator",
    "LocalIdentityAllocator": "local",
    "IdentityID": "ids",
    "IdentityCache": "cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'villi.identity' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"villi.identity.{module}"), name)
    globals()[name] = value
    return value
