"""Cluster identity allocation through the kvstore: agreement between nodes, races,
reference counting, garbage collection, and the identity cache's store feed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from villi.errors import IdentityError
from villi.identity.allocator import (
    ID_PREFIX,
    PREFIX,
    IdentityAllocator,
    IdentityGC,
    collect_garbage,
    id_key,
    ref_key,
    value_key,
)
from villi.identity.cache import IdentityCache
from villi.identity.labels import LabelSet, cidr_labels, pod_identity_labels
from villi.kvstore.store import KeyValue, LeaseID, Store
from villi.testing.kvstore import DelegatingStore, eventually, memory_store

WEB = pod_identity_labels("prod", {"app": "web"})
DB = pod_identity_labels("prod", {"app": "db"})


class HookStore(DelegatingStore):
    """Delegates to a real store; runs ``hooks[(method, key)]`` once before the call."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.hooks: dict[tuple[str, str], Callable[[], Awaitable[None]]] = {}

    async def _hook(self, method: str, key: str) -> None:
        hook = self.hooks.pop((method, key), None)
        if hook is not None:
            await hook()

    async def get(self, key: str) -> KeyValue | None:
        await self._hook("get", key)
        return await self.inner.get(key)

    async def create(self, key: str, value: bytes, lease: LeaseID | None = None) -> bool:
        await self._hook("create", key)
        return await self.inner.create(key, value, lease)

    async def compare_and_delete(self, key: str, expected_mod_revision: int) -> bool:
        await self._hook("compare_and_delete", key)
        return await self.inner.compare_and_delete(key, expected_mod_revision)

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    async with memory_store() as s:
        yield s


async def keys(store: Store) -> dict[str, bytes]:
    return {kv.key: kv.value for kv in (await store.list(PREFIX)).items}


async def test_reserved_and_cidr_labels_never_touch_the_store(store: Store) -> None:
    alloc = IdentityAllocator(store, "node-a")
    assert await alloc.allocate(LabelSet.of("reserved:world")) == 2
    cidr = await alloc.allocate(cidr_labels("10.0.0.0/8"))
    assert cidr == (1 << 24) | 1
    assert await alloc.allocate(cidr_labels("10.0.0.0/8")) == cidr
    assert await alloc.release(cidr_labels("10.0.0.0/8")) is False
    assert await alloc.release(cidr_labels("10.0.0.0/8")) is True
    assert await keys(store) == {}


async def test_first_identity_is_256_with_id_value_and_reference_keys(store: Store) -> None:
    alloc = IdentityAllocator(store, "node-a")
    assert await alloc.allocate(WEB) == 256
    assert await alloc.allocate(DB) == 257
    assert await alloc.allocate(WEB) == 256
    assert alloc.refcount(WEB) == 2 and alloc.lookup(WEB) == 256
    stored = await keys(store)
    assert stored[id_key(256)] == WEB.canonical.encode()
    assert stored[value_key(WEB)] == b"256"
    assert ref_key(WEB, "node-a") in stored
    assert len(stored) == 6


async def test_two_nodes_agree_on_one_identity_concurrently(store: Store) -> None:
    a, b = IdentityAllocator(store, "node-a"), IdentityAllocator(store, "node-b")
    label_sets = [pod_identity_labels("ns", {"app": f"app{i % 7}"}) for i in range(40)]
    results = await asyncio.gather(*(alloc.allocate(lbl) for lbl in label_sets
                                     for alloc in (a, b)))
    by_labels: dict[LabelSet, set[int]] = {}
    for lbl, identity in zip([lbl for lbl in label_sets for _ in (a, b)], results,
                             strict=True):
        by_labels.setdefault(lbl, set()).add(identity)
    assert all(len(ids) == 1 for ids in by_labels.values())
    ids = [next(iter(v)) for v in by_labels.values()]
    assert len(set(ids)) == len(ids) == 7
    stored = await keys(store)
    for lbl, (identity,) in ((k, tuple(v)) for k, v in by_labels.items()):
        assert stored[id_key(identity)] == lbl.canonical.encode()
        assert stored[value_key(lbl)] == str(identity).encode()
    assert len([k for k in stored if k.startswith(ID_PREFIX)]) == 7  # no leaked ids


async def test_losing_the_value_race_reads_the_winners_id(store: Store) -> None:
    hooked = HookStore(store)
    a = IdentityAllocator(hooked, "node-a")
    b = IdentityAllocator(store, "node-b")
    winner: list[int] = []

    async def b_wins() -> None:
        winner.append(await b.allocate(WEB))

    # Forced interleaving: a claims id 256, then -- just before a creates the value
    # key -- b allocates the same labels completely (claiming 257 and the value key).
    hooked.hooks[("create", value_key(WEB))] = b_wins
    got = await a.allocate(WEB)
    assert winner == [got]
    stored = await keys(store)
    assert stored[value_key(WEB)] == str(got).encode()
    assert len([k for k in stored if k.startswith(ID_PREFIX)]) == 1  # loser cleaned up
    assert {ref_key(WEB, "node-a"), ref_key(WEB, "node-b")} <= set(stored)


async def test_id_conflict_moves_on_to_the_next_free_id(store: Store) -> None:
    a = IdentityAllocator(store, "node-a")
    b = IdentityAllocator(store, "node-b")
    assert await a.allocate(WEB) == 256  # a now believes only 256 is used
    assert await b.allocate(DB) == 257
    other = pod_identity_labels("prod", {"app": "other"})
    assert await a.allocate(other) == 258  # tries 257, conflicts, moves on


async def test_release_drops_the_node_reference_at_zero(store: Store) -> None:
    alloc = IdentityAllocator(store, "node-a")
    await alloc.allocate(WEB)
    await alloc.allocate(WEB)
    assert await alloc.release(WEB) is False
    assert ref_key(WEB, "node-a") in await keys(store)
    assert await alloc.release(WEB) is True
    stored = await keys(store)
    assert ref_key(WEB, "node-a") not in stored and value_key(WEB) in stored
    with pytest.raises(IdentityError, match="not held"):
        await alloc.release(WEB)


async def test_restarted_node_gets_the_same_identity(store: Store) -> None:
    first = IdentityAllocator(store, "node-a")
    identity = await first.allocate(WEB)
    again = IdentityAllocator(store, "node-a")
    assert await again.allocate(WEB) == identity


async def test_gc_deletes_only_unreferenced_identities(store: Store) -> None:
    a, b = IdentityAllocator(store, "node-a"), IdentityAllocator(store, "node-b")
    web = await a.allocate(WEB)
    db = await a.allocate(DB)
    await b.allocate(DB)
    await a.release(WEB)
    await a.release(DB)
    gc = IdentityGC(store)  # default: unreferenced in two consecutive passes
    first = await gc.run_once()
    assert first.deleted == () and first.candidates == 1
    assert (await gc.run_once()).deleted == (web,)
    stored = await keys(store)
    assert id_key(web) not in stored and value_key(WEB) not in stored
    assert id_key(db) in stored and value_key(DB) in stored  # node-b still uses it
    await b.release(DB)
    assert await collect_garbage(store) == (db,)
    assert await keys(store) == {}
    # the number is free again (for an allocator that lists the ids afresh)
    assert await IdentityAllocator(store, "node-c").allocate(WEB) == 256


async def test_gc_loses_to_an_allocation_that_races_it(store: Store) -> None:
    a = IdentityAllocator(store, "node-a")
    identity = await a.allocate(WEB)
    await a.release(WEB)
    hooked = HookStore(store)
    b = IdentityAllocator(store, "node-b")
    got: list[int] = []

    async def allocate_meanwhile() -> None:
        got.append(await b.allocate(WEB))

    # GC has listed (no references) and is about to delete: node-b allocates first
    hooked.hooks[("compare_and_delete", value_key(WEB))] = allocate_meanwhile
    result = await IdentityGC(hooked, min_idle_runs=1).run_once()
    assert result.deleted == () and got == [identity]
    stored = await keys(store)
    assert stored[value_key(WEB)] == str(identity).encode() and id_key(identity) in stored


async def test_gc_collects_orphan_id_keys(store: Store) -> None:
    await store.create(id_key(300), WEB.canonical.encode())  # a crashed allocation
    gc = IdentityGC(store)
    assert (await gc.run_once()).deleted == ()
    assert (await gc.run_once()).deleted == (300,)


async def test_dead_node_references_expire_with_its_lease(store: Store) -> None:
    lease = await store.grant_lease(60)
    alloc = IdentityAllocator(store, "node-a", lease=lease)
    identity = await alloc.allocate(WEB)
    await store.revoke_lease(lease)
    assert await collect_garbage(store) == (identity,)


async def test_identity_space_exhaustion_is_an_error(store: Store) -> None:
    alloc = IdentityAllocator(store, "node-a", min_id=256, max_id=257)
    await alloc.allocate(WEB)
    await alloc.allocate(DB)
    with pytest.raises(IdentityError, match="exhausted"):
        await alloc.allocate(pod_identity_labels("prod", {"app": "third"}))


async def test_identity_cache_follows_the_store(store: Store) -> None:
    cache = IdentityCache()
    alloc = IdentityAllocator(store, "node-a")
    web = await alloc.allocate(WEB)
    ready = asyncio.Event()
    task = asyncio.create_task(cache.run(store, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        assert cache.get(web) == WEB
        db = await IdentityAllocator(store, "node-b").allocate(DB)
        await eventually(lambda: cache.get(db) == DB, what="watched identity")
        await alloc.release(WEB)
        await collect_garbage(store)
        await eventually(lambda: cache.get(web) is None, what="deleted identity")
        assert cache.get(2) is not None  # reserved ones stay
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
