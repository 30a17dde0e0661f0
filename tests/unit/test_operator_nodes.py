"""Removing a node on purpose (villi.operator.nodes) and the operator's answer to it:
state withdrawn at once, pod CIDR reclaimed without the grace period; a node whose
entry merely vanished (lease expired) keeps its CIDR for the whole grace period."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from ipaddress import IPv4Network

import pytest

from villi.identity.allocator import VALUE_PREFIX
from villi.ipam.keys import IPAM_PREFIX, NodeEntry, node_key, podcidrs_key
from villi.kvstore import EmbeddedStore, Store
from villi.operator import ClusterCIDRAllocator
from villi.operator.nodes import (
    DELETED_PREFIX,
    IPCACHE_PREFIX,
    delete_node,
    deleted_key,
    withdraw_node,
)

N = IPv4Network


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store() -> AsyncIterator[EmbeddedStore]:
    async with EmbeddedStore(None) as s:
        yield s


async def add_node(store: Store, alloc: ClusterCIDRAllocator, name: str) -> None:
    raw = NodeEntry(name, None, ()).encode()
    await store.put(node_key(name), raw)
    alloc.observe_node(node_key(name), raw)


async def add_pod(store: Store, ip: str, node: str) -> None:
    await store.put(IPCACHE_PREFIX + ip, json.dumps({"identity": 300, "node": node}).encode())


async def test_withdraw_removes_only_that_nodes_state(store) -> None:
    await store.put(node_key("n1"), b"{}")
    await store.put(node_key("n2"), b"{}")
    await add_pod(store, "10.64.0.1", "n1")
    await add_pod(store, "10.64.0.2", "n1")
    await add_pod(store, "10.64.1.1", "n2")
    await store.put(VALUE_PREFIX + "k8s:app=a/n1", b"")
    await store.put(VALUE_PREFIX + "k8s:app=a/n2", b"")
    done = await withdraw_node(store, "n1")
    assert (done.node_entry, done.ipcache, done.identity_refs) == (True, 2, 1)
    left = {kv.key for kv in (await store.list("villi/state/")).items}
    assert left == {node_key("n2"), IPCACHE_PREFIX + "10.64.1.1", VALUE_PREFIX + "k8s:app=a/n2"}
    again = await withdraw_node(store, "n1")   # idempotent
    assert (again.node_entry, again.ipcache, again.identity_refs) == (False, 0, 0)


async def test_deleted_node_is_reclaimed_at_once_despite_grace(store) -> None:
    clock = Clock()
    alloc = ClusterCIDRAllocator(store, grace_period_s=300, clock=clock)
    await add_node(store, alloc, "n1")
    await add_node(store, alloc, "n2")
    await alloc.reconcile()
    await delete_node(store, "n1")
    alloc.observe_node(node_key("n1"), None)
    result = await alloc.reconcile()
    assert result.reclaimed == (("n1", N("10.64.0.0/24")),)
    assert await store.get(podcidrs_key("n1")) is None
    assert (await store.list(DELETED_PREFIX)).items == []   # tombstone consumed
    assert await store.get(podcidrs_key("n2")) is not None


async def test_lease_expiry_waits_for_the_grace_period(store) -> None:
    clock = Clock()
    alloc = ClusterCIDRAllocator(store, grace_period_s=300, clock=clock)
    await add_node(store, alloc, "n1")
    await alloc.reconcile()
    await store.delete(node_key("n1"))   # what a lease expiry looks like
    alloc.observe_node(node_key("n1"), None)
    assert (await alloc.reconcile()).reclaimed == ()
    clock.now += 299
    assert (await alloc.reconcile()).reclaimed == ()
    clock.now += 1
    assert (await alloc.reconcile()).reclaimed == (("n1", N("10.64.0.0/24")),)


async def test_tombstone_alone_makes_the_operator_withdraw(store) -> None:
    """An admin may only say "this node is gone": the operator withdraws and reclaims."""
    alloc = ClusterCIDRAllocator(store, grace_period_s=300, clock=Clock())
    await add_node(store, alloc, "n1")
    await alloc.reconcile()
    await add_pod(store, "10.64.0.1", "n1")
    await store.delete(node_key("n1"))
    alloc.observe_node(node_key("n1"), None)
    await store.put(deleted_key("n1"), b"gone")
    result = await alloc.reconcile()
    assert result.reclaimed == (("n1", N("10.64.0.0/24")),)
    assert (await store.list(IPCACHE_PREFIX)).items == []
    assert (await store.list(IPAM_PREFIX)).items == []


async def test_tombstone_waits_while_the_node_entry_exists(store) -> None:
    alloc = ClusterCIDRAllocator(store, grace_period_s=300, clock=Clock())
    await add_node(store, alloc, "n1")
    await alloc.reconcile()
    await store.put(deleted_key("n1"), b"gone")   # removal under way: agent not stopped
    assert (await alloc.reconcile()).reclaimed == ()
    assert await store.get(podcidrs_key("n1")) is not None
    # the node is added again after its removal: the old tombstone is dropped
    await store.delete(node_key("n1"))
    await add_node(store, alloc, "n1")
    await alloc.reconcile()
    assert await store.get(deleted_key("n1")) is None
    assert await store.get(podcidrs_key("n1")) is not None


def test_default_grace_period_outlasts_a_restart_or_an_outage() -> None:
    """Issue 11 §4: the operator must not reclaim a CIDR whose pods may still use it
    (main reclaimed ~45 s after an agent stopped: a 15 s lease and a 30 s grace)."""
    from villi.agent.config import AgentConfig
    from villi.operator import OperatorSettings

    assert OperatorSettings().grace_period_s >= 300
    assert AgentConfig(node="n").lease_ttl >= 900
