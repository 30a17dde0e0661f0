"""ClusterCIDRAllocator, one reconcile pass at a time, on the in-memory store.

The node view is fed with ``observe_node`` (as the run loop does from its watch) and
the grace period runs on a fake clock, so these tests are deterministic.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from ipaddress import IPv4Network

import pytest

from villi.errors import IPAMError
from villi.ipam.capacity import IPAMUsage
from villi.ipam.keys import (
    IPAM_PREFIX,
    NodeEntry,
    claim_key,
    decode_podcidrs,
    encode_podcidrs,
    node_key,
    podcidrs_key,
)
from villi.kvstore import EmbeddedStore, Store
from villi.operator import (
    ClusterCIDRAllocator,
    OperatorSettings,
    SubnetSpace,
    validate_cluster_cidr,
)
from villi.operator.cidr import _Snapshot

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


async def add_node(store: Store, alloc: ClusterCIDRAllocator, name: str,
                   pod_cidrs: tuple[IPv4Network, ...] = ()) -> None:
    raw = NodeEntry(name, None, pod_cidrs).encode()
    await store.put(node_key(name), raw)
    alloc.observe_node(node_key(name), raw)


async def del_node(store: Store, alloc: ClusterCIDRAllocator, name: str) -> None:
    await store.delete(node_key(name))
    alloc.observe_node(node_key(name), None)


async def podcidrs(store: Store, node: str) -> tuple[IPv4Network, ...] | None:
    kv = await store.get(podcidrs_key(node))
    return None if kv is None else decode_podcidrs(kv.value)


async def claims(store: Store) -> dict[IPv4Network, str]:
    snap = await ClusterCIDRAllocator(store)._snapshot()
    return {c: owner for c, (owner, _) in snap.claims.items()}


async def check_consistent(store: Store, nodes: set[str]) -> dict[str, IPv4Network]:
    """Each node has exactly one CIDR, claimed by it; no CIDR twice; no stray claim."""
    snap: _Snapshot = await ClusterCIDRAllocator(store)._snapshot()
    assert set(snap.podcidrs) == nodes
    got = {}
    for node, (cidrs, _) in snap.podcidrs.items():
        assert len(cidrs) == 1, (node, cidrs)
        got[node] = cidrs[0]
        assert snap.claims[cidrs[0]][0] == node
    assert len(set(got.values())) == len(got)
    assert {c: o for c, (o, _) in snap.claims.items()} == {c: n for n, c in got.items()}
    return got


# --- assignment --------------------------------------------------------------------------------


async def test_a_new_node_gets_the_lowest_free_24(store) -> None:
    alloc = ClusterCIDRAllocator(store, grace_period_s=0)
    await add_node(store, alloc, "n1")
    result = await alloc.reconcile()
    assert result.assigned == (("n1", N("10.64.0.0/24")),)
    assert await podcidrs(store, "n1") == (N("10.64.0.0/24"),)
    assert (await store.get(claim_key(N("10.64.0.0/24")))).value == b"n1"
    assert alloc.assignments == {"n1": (N("10.64.0.0/24"),)}
    # A second pass changes nothing.
    again = await alloc.reconcile()
    assert (again.assigned, again.reclaimed, again.repaired) == ((), (), 0)


async def test_two_nodes_get_distinct_cidrs(store) -> None:
    alloc = ClusterCIDRAllocator(store)
    await add_node(store, alloc, "n2")
    await add_node(store, alloc, "n1")
    await alloc.reconcile()
    assert await check_consistent(store, {"n1", "n2"}) == {
        "n1": N("10.64.0.0/24"), "n2": N("10.64.1.0/24")}


async def test_node_mask_and_cluster_cidr_are_honoured(store) -> None:
    alloc = ClusterCIDRAllocator(store, cluster_cidr="172.20.0.0/16", node_mask=26)
    for name in ("a", "b", "c"):
        await add_node(store, alloc, name)
    await alloc.reconcile()
    assert await check_consistent(store, {"a", "b", "c"}) == {
        "a": N("172.20.0.0/26"), "b": N("172.20.0.64/26"), "c": N("172.20.0.128/26")}


async def test_node_hint_gets_its_old_cidr_back_when_free(store) -> None:
    alloc = ClusterCIDRAllocator(store)
    await add_node(store, alloc, "n1", (N("10.64.7.0/24"),))
    await add_node(store, alloc, "n2", (N("10.64.7.0/24"),))  # wants the same one
    await add_node(store, alloc, "n3", (N("10.200.0.0/24"),))  # outside: ignored
    await alloc.reconcile()
    assert await check_consistent(store, {"n1", "n2", "n3"}) == {
        "n1": N("10.64.7.0/24"), "n2": N("10.64.0.0/24"), "n3": N("10.64.1.0/24")}


async def test_exhausted_cluster_cidr_reports_an_error(store) -> None:
    alloc = ClusterCIDRAllocator(store, cluster_cidr="10.64.0.0/23")
    for name in ("a", "b", "c"):
        await add_node(store, alloc, name)
    result = await alloc.reconcile()
    assert [n for n, _ in result.assigned] == ["a", "b"]
    assert result.errors == ("cluster CIDR 10.64.0.0/23 has no free /24 left for node c; "
                             "widen --cluster-cidr or remove nodes",)
    assert await podcidrs(store, "c") is None


async def test_unreadable_node_entry_still_gets_a_cidr(store) -> None:
    alloc = ClusterCIDRAllocator(store)
    await store.put(node_key("odd"), b"not json")
    alloc.observe_node(node_key("odd"), b"not json")
    alloc.observe_node("villi/state/nodes/v1/cluster/nested", b"{}")  # not a node key
    await alloc.reconcile()
    assert await check_consistent(store, {"odd"}) == {"odd": N("10.64.0.0/24")}


# --- reclaim -----------------------------------------------------------------------------------


async def test_gone_node_is_reclaimed_and_its_cidr_reused(store) -> None:
    alloc = ClusterCIDRAllocator(store, grace_period_s=0)
    await add_node(store, alloc, "n1")
    await add_node(store, alloc, "n2")
    await alloc.reconcile()
    await del_node(store, alloc, "n1")
    result = await alloc.reconcile()
    assert result.reclaimed == (("n1", N("10.64.0.0/24")),)
    assert await podcidrs(store, "n1") is None
    assert await claims(store) == {N("10.64.1.0/24"): "n2"}
    await add_node(store, alloc, "n3")
    await alloc.reconcile()
    assert await check_consistent(store, {"n2", "n3"}) == {
        "n2": N("10.64.1.0/24"), "n3": N("10.64.0.0/24")}


async def test_reclaim_waits_for_the_grace_period(store) -> None:
    clock = Clock()
    alloc = ClusterCIDRAllocator(store, grace_period_s=30, clock=clock)
    await add_node(store, alloc, "n1")
    await alloc.reconcile()
    await del_node(store, alloc, "n1")
    result = await alloc.reconcile()
    assert result.reclaimed == () and result.next_deadline == 1030.0
    clock.now += 29.9
    assert (await alloc.reconcile()).reclaimed == ()
    assert await podcidrs(store, "n1") == (N("10.64.0.0/24"),)
    clock.now += 0.1
    assert (await alloc.reconcile()).reclaimed == (("n1", N("10.64.0.0/24")),)
    assert (await store.list(IPAM_PREFIX)).items == []


async def test_node_back_within_grace_keeps_its_cidr(store) -> None:
    clock = Clock()
    alloc = ClusterCIDRAllocator(store, grace_period_s=30, clock=clock)
    await add_node(store, alloc, "n1")
    await add_node(store, alloc, "n2")
    await alloc.reconcile()
    await del_node(store, alloc, "n1")
    await alloc.reconcile()
    clock.now += 20
    await add_node(store, alloc, "n1")
    await alloc.reconcile()
    clock.now += 100
    result = await alloc.reconcile()
    assert result.reclaimed == () and result.next_deadline is None
    assert await check_consistent(store, {"n1", "n2"}) == {
        "n1": N("10.64.0.0/24"), "n2": N("10.64.1.0/24")}
    # Gone again later: the grace period starts over.
    await del_node(store, alloc, "n1")
    assert (await alloc.reconcile()).next_deadline == clock.now + 30


async def test_reclaim_rechecks_the_store_before_deleting(store) -> None:
    alloc = ClusterCIDRAllocator(store, grace_period_s=0)
    await add_node(store, alloc, "n1")
    await alloc.reconcile()
    alloc.observe_node(node_key("n1"), None)  # a stale view: the entry is still there
    assert (await alloc.reconcile()).reclaimed == ()
    assert await podcidrs(store, "n1") == (N("10.64.0.0/24"),)


async def test_operator_restart_gives_absent_nodes_a_full_grace_period(store) -> None:
    clock = Clock()
    first = ClusterCIDRAllocator(store, grace_period_s=30, clock=clock)
    await add_node(store, first, "n1")
    await first.reconcile()
    await store.delete(node_key("n1"))
    clock.now += 1000
    restarted = ClusterCIDRAllocator(store, grace_period_s=30, clock=clock)
    assert (await restarted.reconcile()).next_deadline == clock.now + 30
    assert await podcidrs(store, "n1") is not None


# --- repairs -----------------------------------------------------------------------------------


async def test_repairs_on_start(store) -> None:
    alloc = ClusterCIDRAllocator(store, grace_period_s=0)
    for name in ("adopt", "heal", "victim", "owner", "stale", "corrupt"):
        await add_node(store, alloc, name)
    # adopt: a claim without podcidrs (an operator died between the two writes).
    await store.put(claim_key(N("10.64.5.0/24")), b"adopt")
    # heal: podcidrs without a claim.
    await store.put(podcidrs_key("heal"), encode_podcidrs([N("10.64.6.0/24")]))
    # victim: podcidrs listing a CIDR another node holds the claim of.
    await store.put(claim_key(N("10.64.7.0/24")), b"owner")
    await store.put(podcidrs_key("owner"), encode_podcidrs([N("10.64.7.0/24")]))
    await store.put(podcidrs_key("victim"), encode_podcidrs([N("10.64.7.0/24")]))
    # stale: a second claim its podcidrs do not list.
    await store.put(claim_key(N("10.64.8.0/24")), b"stale")
    await store.put(claim_key(N("10.64.9.0/24")), b"stale")
    await store.put(podcidrs_key("stale"), encode_podcidrs([N("10.64.8.0/24")]))
    # corrupt: unreadable podcidrs.
    await store.put(podcidrs_key("corrupt"), b"{{{")
    # ghost: a claim of a node that does not exist (reclaimed, grace 0).
    await store.put(claim_key(N("10.64.10.0/24")), b"ghost")

    result = await alloc.reconcile()
    assert "pod CIDR 10.64.7.0/24 of node victim is claimed by owner" in result.errors[0]
    assert result.reclaimed == (("ghost", N("10.64.10.0/24")),)
    got = await check_consistent(store, {"adopt", "heal", "victim", "owner", "stale",
                                         "corrupt"})
    assert got["adopt"] == N("10.64.5.0/24")
    assert got["heal"] == N("10.64.6.0/24")
    assert got["owner"] == N("10.64.7.0/24")
    assert got["stale"] == N("10.64.8.0/24")
    # Nodes needing a new CIDR get the lowest free ones, in name order.
    assert got["corrupt"] == N("10.64.0.0/24") and got["victim"] == N("10.64.1.0/24")
    assert (await alloc.reconcile()).repaired == 0


# --- concurrency -------------------------------------------------------------------------------


async def test_two_allocators_racing_never_double_allocate(store) -> None:
    a = ClusterCIDRAllocator(store, cluster_cidr="10.64.0.0/19")  # 32 subnets
    b = ClusterCIDRAllocator(store, cluster_cidr="10.64.0.0/19")
    names = {f"n{i:02d}" for i in range(30)}
    for round_ in range(3):
        batch = sorted(names)[round_ * 10:(round_ + 1) * 10]
        for name in batch:
            await store.put(node_key(name), NodeEntry(name, None).encode())
        # Each allocator sees the nodes in a different order and at different times.
        for name in batch:
            a.observe_node(node_key(name), NodeEntry(name, None).encode())
        for name in reversed(batch):
            b.observe_node(node_key(name), NodeEntry(name, None).encode())
        await asyncio.gather(a.reconcile(), b.reconcile(), a.reconcile())
    await asyncio.gather(a.reconcile(), b.reconcile())
    got = await check_consistent(store, names)
    assert set(got.values()) <= set(N("10.64.0.0/19").subnets(new_prefix=24))


# --- settings ----------------------------------------------------------------------------------


def test_cluster_cidr_covering_the_resolver_is_refused() -> None:
    with pytest.raises(IPAMError) as err:
        validate_cluster_cidr("10.0.0.0/8", 24)
    assert "10.0.0.0/8 overlaps 10.255.0.0/16" in str(err.value)
    assert "resolver" in str(err.value) and "10.64.0.0/10" in str(err.value)
    for bad in ("10.255.3.0/24", "10.128.0.0/9", "0.0.0.0/0"):
        with pytest.raises(IPAMError, match="10.255.0.0/16"):
            validate_cluster_cidr(bad, 24)
    with pytest.raises(IPAMError, match="10.255.0.0/16"):
        OperatorSettings(cluster_cidr="10.0.0.0/8")
    with pytest.raises(IPAMError, match="10.255.0.0/16"):
        ClusterCIDRAllocator(EmbeddedStore(None), cluster_cidr="10.254.0.0/15")


def test_default_cluster_cidr_is_accepted() -> None:
    net = validate_cluster_cidr("10.64.0.0/10", 24)
    assert str(net[-1]) == "10.127.255.255"
    assert OperatorSettings().cluster_network == net


@pytest.mark.parametrize("cidr, mask", [("10.64.0.0/24", 23), ("10.64.0.0/10", 31),
                                        ("10.64.0.1/10", 24), ("nonsense", 24)])
def test_bad_cidr_or_mask_refused(cidr: str, mask: int) -> None:
    with pytest.raises(IPAMError):
        validate_cluster_cidr(cidr, mask)


def test_subnet_space_arithmetic() -> None:
    space = SubnetSpace.parse("10.64.0.0/10", 24)
    assert space.count == 16384
    assert space.subnet(0) == N("10.64.0.0/24") and space.subnet(16383) == N("10.127.255.0/24")
    assert space.indices(N("10.64.2.0/23")) == range(2, 4)
    assert space.indices(N("10.64.5.128/25")) == range(5, 6)
    assert space.indices(N("10.0.0.0/8")) == range(0, 16384)
    assert space.indices(N("192.168.0.0/16")) == range(0)
    assert space.reserved_indices() == set()
    assert space.assignable(N("10.64.9.0/24")) and not space.assignable(N("10.64.9.0/25"))
    with pytest.raises(IndexError):
        space.subnet(16384)


async def test_claims_of_another_size_block_what_they_overlap(store) -> None:
    await store.put(claim_key(N("10.64.0.0/23")), b"old")  # an operator with --node-mask 23
    await store.put(podcidrs_key("old"), encode_podcidrs([N("10.64.0.0/23")]))
    alloc = ClusterCIDRAllocator(store)
    await add_node(store, alloc, "old")
    await add_node(store, alloc, "new")
    await alloc.reconcile()
    assert await podcidrs(store, "new") == (N("10.64.2.0/24"),)
    assert await podcidrs(store, "old") == (N("10.64.0.0/23"),)


def test_only_membership_and_wish_changes_need_a_pass() -> None:
    alloc = ClusterCIDRAllocator(EmbeddedStore(None))
    key = node_key("n1")
    usage_only = [NodeEntry("n1", None, (), IPAMUsage(k, 254)).encode() for k in range(2)]
    assert alloc.observe_node(key, usage_only[0]) is True  # new node
    assert alloc.observe_node(key, usage_only[1]) is False  # usage changed only
    assert alloc.observe_node(key, NodeEntry("n1", None, (N("10.64.3.0/24"),)).encode())
    assert alloc.observe_node(key, None) is True
    assert alloc.observe_node(key, None) is False
    assert alloc.observe_node(key, b"junk") is True
    assert alloc.observe_node("villi/state/nodes/v1/x/y", b"{}") is False


async def test_claims_naming_no_valid_node_are_dropped(store) -> None:
    await store.put(claim_key(N("10.64.0.0/24")), b"bad/name")
    await store.put(claim_key(N("10.64.1.0/24")), b" spaced ")
    alloc = ClusterCIDRAllocator(store)
    await add_node(store, alloc, "n1")
    result = await alloc.reconcile()
    assert result.repaired == 2
    assert await check_consistent(store, {"n1"}) == {"n1": N("10.64.0.0/24")}  # freed


async def test_podcidrs_overlapping_another_nodes_wider_claim_is_a_conflict(store) -> None:
    await store.put(claim_key(N("10.64.0.0/23")), b"wide")
    await store.put(podcidrs_key("wide"), encode_podcidrs([N("10.64.0.0/23")]))
    await store.put(podcidrs_key("narrow"), encode_podcidrs([N("10.64.1.0/24")]))  # no claim
    alloc = ClusterCIDRAllocator(store)
    await add_node(store, alloc, "wide")
    await add_node(store, alloc, "narrow")
    result = await alloc.reconcile()
    assert "pod CIDR 10.64.1.0/24 of node narrow is claimed by wide" in result.errors[0]
    assert await podcidrs(store, "narrow") == (N("10.64.2.0/24"),)
    assert await store.get(claim_key(N("10.64.1.0/24"))) is None
