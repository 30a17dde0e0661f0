"""LeaseKeeper details that need a fast clock (the contract suite covers the rest)."""

from __future__ import annotations

import asyncio

from villi.errors import StoreUnavailable
from villi.kvstore import LeaseID, LeaseKeeper
from villi.testing.kvstore import eventually, memory_store


async def quick(delay: float) -> None:
    await asyncio.sleep(0.001)


async def test_lease_keeper_retries_a_failed_on_lost_with_the_same_lease() -> None:
    async with memory_store() as store:
        calls: list[LeaseID] = []

        async def on_lost(lease: LeaseID) -> None:
            calls.append(lease)
            if len(calls) == 1:
                raise StoreUnavailable("etcd blinked while re-writing keys")
            await store.put("villi/state/nodes/v1/default/n1", b"n1", lease=lease)

        async with LeaseKeeper(store, 60, on_lost=on_lost, sleep=quick) as keeper:
            first = keeper.lease
            assert first is not None
            await store.revoke_lease(first)
            await eventually(lambda: len(calls) >= 2, what="on_lost retried")
            assert calls[0] == calls[1] == keeper.lease != first
            assert keeper.losses == 1  # retrying the callback did not grant again
            kv = await store.get("villi/state/nodes/v1/default/n1")
            assert kv is not None and kv.lease == keeper.lease


async def test_lease_keeper_stop_without_revoke_keeps_keys() -> None:
    async with memory_store() as store:
        keeper = LeaseKeeper(store, 60, sleep=quick)
        lease = await keeper.start()
        await store.put("k", b"v", lease=lease)
        await keeper.stop(revoke=False)  # e.g. an agent restarting: its keys stay
        assert await store.get("k") is not None
        assert await store.keep_alive(lease) is True
