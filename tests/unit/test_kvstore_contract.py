"""The Store contract: every test here runs against every backend.

Backends: the embedded store in memory, the embedded store on a file, and a real etcd
on loopback (skipped when /usr/bin/etcd is missing). One etcd serves the whole module;
each test works under its own unique key prefix, so tests do not see each other.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

import pytest

from villi.errors import StoreError
from villi.kvstore import (
    Compacted,
    EmbeddedStore,
    EtcdStore,
    EventType,
    LeaseKeeper,
    PrefixSync,
    Store,
    watch_prefix,
)
from villi.testing.etcd import EtcdServer, etcd_available
from villi.testing.kvstore import FlakyStore, eventually, take

PUT, DELETE = EventType.PUT, EventType.DELETE

BACKENDS = [
    "memory",
    "file",
    pytest.param(
        "etcd",
        marks=[pytest.mark.etcd,
               pytest.mark.skipif(not etcd_available(), reason="needs /usr/bin/etcd")],
    ),
]


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Store]:
    if request.param == "memory":
        s: Store = EmbeddedStore(None)
    elif request.param == "file":
        s = EmbeddedStore(tmp_path / "kv.db")
    else:
        s = EtcdStore(request.getfixturevalue("etcd_server").endpoint)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def p() -> str:
    """This test's own key prefix."""
    return f"test/{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def ttl(store: Store) -> int:
    """The shortest lease TTL the backend honours (etcd raises anything below ~2 s)."""
    return 2 if isinstance(store, EtcdStore) else 1


def brief(events) -> list[tuple[EventType, str, bytes]]:
    return [(e.type, e.key, e.value) for e in events]


# --- keys and values -----------------------------------------------------------------------


async def test_get_put_delete(store: Store, p: str) -> None:
    assert await store.get(p + "a") is None
    rev1 = await store.put(p + "a", b"1")
    kv = await store.get(p + "a")
    assert kv is not None and kv.value == b"1" and kv.lease is None
    assert kv.create_revision == kv.mod_revision == rev1
    rev2 = await store.put(p + "a", b"2")
    kv = await store.get(p + "a")
    assert rev2 > rev1 and kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision) == (b"2", rev1, rev2)
    await store.put(p + "empty", b"")
    assert (await store.get(p + "empty")).value == b""  # type: ignore[union-attr]
    assert await store.delete(p + "a") is True
    assert await store.delete(p + "a") is False
    assert await store.get(p + "a") is None


async def test_list_sorted_with_revision(store: Store, p: str) -> None:
    for key in ("b", "a", "c/d", "ü"):
        await store.put(p + key, key.encode())
    await store.put(p[:-1] + "0", b"sibling outside the prefix")  # "test/xyz0" > "test/xyz/"
    rev = await store.put(p + "c", b"c")
    listing = await store.list(p)
    assert [kv.key for kv in listing.items] == [p + k for k in ("a", "b", "c", "c/d", "ü")]
    assert listing.revision == rev
    assert await store.revision() == rev
    assert (await store.list(p + "nothing/")).items == []


async def test_delete_prefix(store: Store, p: str) -> None:
    for key in ("x/1", "x/2", "x/2/deeper", "xy", "y"):
        await store.put(p + key, b"v")
    assert await store.delete_prefix(p + "x/") == 3
    assert [kv.key for kv in (await store.list(p)).items] == [p + "xy", p + "y"]
    assert await store.delete_prefix(p + "x/") == 0


async def test_create_if_absent(store: Store, p: str) -> None:
    assert await store.create(p + "id/256", b"labels-a") is True
    assert await store.create(p + "id/256", b"labels-b") is False
    assert (await store.get(p + "id/256")).value == b"labels-a"  # type: ignore[union-attr]
    await store.delete(p + "id/256")
    assert await store.create(p + "id/256", b"labels-c") is True


async def test_compare_and_swap(store: Store, p: str) -> None:
    assert await store.compare_and_swap(p + "k", 0, b"first") is True  # 0: must not exist
    assert await store.compare_and_swap(p + "k", 0, b"again") is False
    kv = await store.get(p + "k")
    assert kv is not None
    assert await store.compare_and_swap(p + "k", kv.mod_revision, b"second") is True
    # A writer that read the old revision loses the race.
    assert await store.compare_and_swap(p + "k", kv.mod_revision, b"stale") is False
    assert (await store.get(p + "k")).value == b"second"  # type: ignore[union-attr]
    current = await store.get(p + "k")
    assert current is not None
    assert await store.compare_and_delete(p + "k", kv.mod_revision) is False
    assert await store.compare_and_delete(p + "k", current.mod_revision) is True
    assert await store.get(p + "k") is None
    assert await store.compare_and_delete(p + "k", current.mod_revision) is False


# --- leases --------------------------------------------------------------------------------


async def test_lease_revoke_deletes_keys_and_emits_deletes(store: Store, p: str) -> None:
    lease = await store.grant_lease(60)
    await store.put(p + "node/a", b"a", lease=lease)
    await store.put(p + "node/b", b"b", lease=lease)
    rev = await store.put(p + "other", b"no lease")
    assert (await store.get(p + "node/a")).lease == lease  # type: ignore[union-attr]
    async with aclosing(store.watch(p, rev + 1)) as watch:
        await store.revoke_lease(lease)
        events = await take(watch, 2)
    assert brief(events) == [(DELETE, p + "node/a", b""), (DELETE, p + "node/b", b"")]
    assert events[0].revision == events[1].revision  # one revision, as etcd
    assert [kv.key for kv in (await store.list(p)).items] == [p + "other"]
    assert await store.keep_alive(lease) is False
    await store.revoke_lease(lease)  # revoking twice is not an error
    with pytest.raises(StoreError):
        await store.put(p + "node/c", b"c", lease=lease)


async def test_lease_keep_alive_outlives_ttl(store: Store, p: str, ttl: int) -> None:
    lease = await store.grant_lease(ttl)
    await store.put(p + "alive", b"v", lease=lease)
    for _ in range(3):  # 1.5 x TTL in total
        await asyncio.sleep(ttl / 2)
        assert await store.keep_alive(lease) is True
    assert await store.get(p + "alive") is not None


async def test_lease_expiry_deletes_keys_with_event(store: Store, p: str, ttl: int) -> None:
    lease = await store.grant_lease(ttl)
    rev = await store.put(p + "ephemeral", b"v", lease=lease)
    await store.put(p + "stays", b"v")
    async with aclosing(store.watch(p, rev + 1)) as watch:
        # Nobody touches the store: the expiry must come from the backend itself.
        events = await take(watch, 2, timeout=ttl + 5)
    assert brief(events) == [(PUT, p + "stays", b"v"), (DELETE, p + "ephemeral", b"")]
    assert await store.get(p + "ephemeral") is None
    assert await store.keep_alive(lease) is False


async def test_lease_keeper_keeps_and_regrants(store: Store, p: str, ttl: int) -> None:
    lost = []

    async def on_lost(new_lease):
        lost.append(new_lease)
        await store.put(p + "node", b"me", lease=new_lease)

    async with LeaseKeeper(store, ttl, on_lost=on_lost) as keeper:
        first = keeper.lease
        await store.put(p + "node", b"me", lease=first)
        await asyncio.sleep(ttl * 1.5)
        assert await store.get(p + "node") is not None
        await store.revoke_lease(first)  # lost behind the keeper's back
        await eventually(lambda: bool(lost), timeout=ttl * 3, what="lease re-granted")
        assert keeper.lease == lost[0] != first
        kv = await store.get(p + "node")
        assert kv is not None and kv.lease == keeper.lease
    assert await store.get(p + "node") is None  # leaving the block revokes the lease


# --- watches ---------------------------------------------------------------------------------


async def test_watch_replays_history_then_live(store: Store, p: str) -> None:
    start = await store.put(p + "a", b"1")
    await store.put(p + "b", b"1")
    await store.put(p[:-1] + "-outside", b"not ours")
    await store.put(p + "a", b"2")
    async with aclosing(store.watch(p, start)) as watch:
        history = await take(watch, 3)
        await store.delete_prefix(p)
        await store.put(p + "c", b"live")
        live = await take(watch, 3)
    assert brief(history) == [(PUT, p + "a", b"1"), (PUT, p + "b", b"1"), (PUT, p + "a", b"2")]
    assert history[0].revision == start
    assert brief(live) == [(DELETE, p + "a", b""), (DELETE, p + "b", b""), (PUT, p + "c", b"live")]
    assert live[0].revision == live[1].revision < live[2].revision


async def test_watch_from_now(store: Store, p: str) -> None:
    await store.put(p + "old", b"x")
    async with aclosing(store.watch(p)) as watch:
        first = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.2)  # let the watch start (None means "from when it starts")
        await store.put(p + "new", b"y")
        event = await asyncio.wait_for(first, 10)
    assert (event.type, event.key) == (PUT, p + "new")


async def test_watch_compacted(store: Store, p: str) -> None:
    first = await store.put(p + "a", b"1")
    await store.put(p + "a", b"2")
    last = await store.put(p + "a", b"3")
    await store.compact(last)
    await store.compact(first)  # older than what is already compacted: no-op
    with pytest.raises(Compacted) as info:
        async with aclosing(store.watch(p, first)) as watch:
            await take(watch, 1)
    assert info.value.compact_revision >= last
    with pytest.raises(StoreError):
        await store.compact(last + 1000)
    async with aclosing(store.watch(p, last)) as watch:  # the kept revision itself is fine
        assert brief(await take(watch, 1)) == [(PUT, p + "a", b"3")]


async def test_list_then_watch(store: Store, p: str) -> None:
    await store.put(p + "a", b"1")
    await store.put(p + "b", b"1")
    sync = PrefixSync(store, p)
    async with aclosing(aiter(sync)) as events:
        snapshot = await take(events, 2)
        await store.put(p + "a", b"2")
        await store.delete(p + "b")
        live = await take(events, 2)
        assert sync.synced.is_set()
    assert brief(snapshot) == [(PUT, p + "a", b"1"), (PUT, p + "b", b"1")]
    assert brief(live) == [(PUT, p + "a", b"2"), (DELETE, p + "b", b"")]
    assert sync.known == {p + "a": live[0].revision}

    async with aclosing(watch_prefix(store, p)) as events:  # the plain function form
        assert brief(await take(events, 1)) == [(PUT, p + "a", b"2")]


async def test_list_then_watch_resyncs_after_compaction(store: Store, p: str) -> None:
    for key in ("a", "b", "c"):
        await store.put(p + key, b"1")
    gate = asyncio.Event()
    sleeps: list[float] = []

    async def held_sleep(delay: float) -> None:
        sleeps.append(delay)
        await gate.wait()

    flaky = FlakyStore(store)
    sync = PrefixSync(flaky, p, sleep=held_sleep)
    async with aclosing(aiter(sync)) as events:
        assert len(await take(events, 3)) == 3
        # The consumer waits for more while the watch dies on the next event ("d").
        flaky.broken = True
        consumer = asyncio.ensure_future(take(events, 4))
        await store.put(p + "d", b"1")
        await eventually(lambda: bool(sleeps), what="sync backs off")
        flaky.broken = False
        # While the follower is away: a change, a delete, a new key, and compaction.
        await store.put(p + "a", b"2")
        await store.delete(p + "b")
        await store.compact(await store.put(p + "e", b"1"))
        gate.set()
        resync = await consumer
        await store.put(p + "f", b"live")
        live = await take(events, 1)
    assert brief(resync) == [
        (DELETE, p + "b", b""), (PUT, p + "a", b"2"), (PUT, p + "d", b"1"), (PUT, p + "e", b"1")]
    assert brief(live) == [(PUT, p + "f", b"live")]
    assert set(sync.known) == {p + k for k in ("a", "c", "d", "e", "f")}
    assert len(sleeps) >= 2  # once for the broken watch, once for the compaction


# --- commit: many writes, one transaction (issue 11 §3) -------------------------------------


async def test_commit_writes_everything_in_one_revision(store: Store, p: str) -> None:
    from villi.kvstore import TxnOp

    await store.put(p + "gone", b"x")
    start = await store.revision()
    async with aclosing(store.watch(p, start + 1)) as events:
        rev = await store.commit(
            [TxnOp(p + "a", b"1"), TxnOp(p + "b", b"2"), TxnOp(p + "gone", None)],
            {p + "a": 0, p + "gone": (await store.get(p + "gone")).mod_revision})
        assert rev is not None and rev > start
        seen = await take(events, 3)
    assert {(e.type, e.key) for e in seen} == {(PUT, p + "a"), (PUT, p + "b"),
                                               (DELETE, p + "gone")}
    assert {e.revision for e in seen} == {rev}
    assert [kv.key for kv in (await store.list(p)).items] == [p + "a", p + "b"]


async def test_commit_with_a_stale_expectation_writes_nothing(store: Store, p: str) -> None:
    from villi.kvstore import TxnOp

    await store.put(p + "a", b"old")
    before = await store.revision()
    assert await store.commit([TxnOp(p + "a", b"new"), TxnOp(p + "b", b"2")],
                              {p + "a": 0}) is None
    assert (await store.get(p + "a")).value == b"old"
    assert await store.get(p + "b") is None
    assert await store.revision() == before


async def test_commit_refuses_duplicate_keys(store: Store, p: str) -> None:
    from villi.kvstore import TxnOp

    with pytest.raises(ValueError, match="twice"):
        await store.commit([TxnOp(p + "a", b"1"), TxnOp(p + "a", None)], {})
    assert await store.get(p + "a") is None


async def test_commit_attaches_puts_to_their_lease(store: Store, p: str) -> None:
    """The kvstoremesh writes its cache in leased transactions: revoking the lease
    removes what the commit wrote, and a dead lease fails the whole commit."""
    from villi.errors import StoreError
    from villi.kvstore import TxnOp

    lease = await store.grant_lease(60)
    await store.commit([TxnOp(p + "leased", b"1", lease), TxnOp(p + "kept", b"2")], {})
    await store.revoke_lease(lease)
    assert await store.get(p + "leased") is None
    assert (await store.get(p + "kept")).value == b"2"
    before = await store.revision()
    with pytest.raises(StoreError):
        await store.commit([TxnOp(p + "x", b"1"), TxnOp(p + "y", b"2", lease)], {})
    assert await store.get(p + "x") is None
    assert await store.revision() == before


async def test_list_of_many_keys_is_whole_and_sorted(store: Store, p: str) -> None:
    """etcd lists in growing pages (1,000, then 2,000, …): every key once, in order."""
    from villi.kvstore import TxnOp

    names = [f"{p}k{i:05d}" for i in range(3500)]
    for i in range(0, len(names), 100):
        await store.commit([TxnOp(k, b"v") for k in names[i:i + 100]], {})
    listing = await store.list(p)
    assert [kv.key for kv in listing.items] == names
    assert listing.revision == await store.revision()
