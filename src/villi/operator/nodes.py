"""Removing a node on purpose: withdraw its state at once, free its pod CIDR at once.

Node and ipcache entries live under the agent's lease, and that lease is long (15 min
by default, as Cilium's): an agent that is merely down or cut off from the store keeps
its pods reachable from every other node (fail-static). That is right for an outage and
wrong for a node that is gone for good, so removal on purpose has its own path:

1. :func:`delete_node` (``villi lab node del``, or an admin) deletes the node entry, the
   ipcache entries of its pods and its identity references, and leaves a tombstone
   ``villi/state/ipam/v1/deleted/<node>``. Every other agent withdraws the node's
   routes and ipcache entries as soon as its watch delivers the deletes.
2. The operator (:class:`villi.operator.cidr.ClusterCIDRAllocator`) sees the tombstone,
   repeats the withdrawal (an admin may write only the tombstone: "this node is gone"),
   reclaims the node's pod CIDR without waiting for the grace period, and deletes the
   tombstone. A tombstone older than a node entry of the same name (the node was added
   again) is simply dropped.

Each step is idempotent, so an interrupted removal is finished by running it again or by
the operator's next pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from villi.errors import SchemaError
from villi.identity.allocator import VALUE_PREFIX
from villi.ipam.keys import IPAM_PREFIX, check_node_name, node_key
from villi.kvstore import schema
from villi.kvstore.schema import IpcacheEntry
from villi.kvstore.store import Store

log = logging.getLogger(__name__)

#: A node removed on purpose: ``<prefix><node>`` (value: why, free text).
DELETED_PREFIX = IPAM_PREFIX + "deleted/"
#: Ipcache entries of pods (``villi.kvstore.schema.IpcacheEntry``).
IPCACHE_PREFIX = schema.IPCACHE


def deleted_key(node: str) -> str:
    return DELETED_PREFIX + check_node_name(node)


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """What :func:`withdraw_node` deleted."""

    node_entry: bool
    ipcache: int
    identity_refs: int


async def withdraw_node(store: Store, node: str) -> Withdrawn:
    """Delete node ``node``'s entry, its pods' ipcache entries and its identity
    references (the keys its lease would have taken with it when it expired)."""
    check_node_name(node)
    entry = await store.delete(node_key(node))
    ipcache = 0
    for kv in (await store.list(IPCACHE_PREFIX)).items:
        try:
            owner = IpcacheEntry.decode(kv.value, kv.key).node
        except SchemaError:
            continue
        if owner == node and await store.compare_and_delete(kv.key, kv.mod_revision):
            ipcache += 1
    refs = 0
    for kv in (await store.list(VALUE_PREFIX)).items:
        if kv.key.endswith("/" + node) and await store.compare_and_delete(
                kv.key, kv.mod_revision):
            refs += 1
    return Withdrawn(entry, ipcache, refs)


async def delete_node(store: Store, node: str, reason: str = "deleted on purpose"
                      ) -> Withdrawn:
    """Remove node ``node`` on purpose (its agent must be stopped first, or it writes
    its entries again): withdraw its state now and tell the operator to reclaim its
    pod CIDR without a grace period."""
    await store.put(deleted_key(node), reason.encode())
    done = await withdraw_node(store, node)
    log.info("node %s deleted: entry %s, %d ipcache entries, %d identity references",
             node, "removed" if done.node_entry else "absent", done.ipcache,
             done.identity_refs)
    return done
