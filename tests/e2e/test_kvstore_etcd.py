"""The etcd backend against a real etcd: restarts, races between processes, outages.

(The Store contract itself runs against etcd in tests/unit/test_kvstore_contract.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from villi.errors import StoreUnavailable
from villi.kvstore import BackoffPolicy, EtcdStore, EventType, WatchEvent
from villi.testing.etcd import EtcdServer, etcd_available, free_port
from villi.testing.kvstore import check_one_winner_per_key, eventually, race_create

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not etcd_available(), reason="needs /usr/bin/etcd"),
]

PUT, DELETE = EventType.PUT, EventType.DELETE


@pytest.fixture
def server() -> Iterator[EtcdServer]:
    """A fresh etcd per test: these tests stop and restart it."""
    with EtcdServer(unix_socket=True) as s:
        yield s


async def test_watch_survives_restarts_without_loss_or_duplicates(server: EtcdServer) -> None:
    gate = asyncio.Event()
    reconnect_waits: list[float] = []

    async def gated_sleep(delay: float) -> None:
        # Hold the watch's reconnect until the test has written behind its back.
        reconnect_waits.append(delay)
        await gate.wait()
        await asyncio.sleep(delay)

    received: list[WatchEvent] = []
    async with (
        EtcdStore(server.endpoint, sleep=gated_sleep) as watcher,
        EtcdStore(server.endpoint) as writer,
    ):
        start = await writer.put("w/0", b"0")

        async def follow() -> None:
            async for event in watcher.watch("w/", start):
                received.append(event)

        task = asyncio.create_task(follow())
        try:
            await writer.put("w/1", b"1")
            await eventually(lambda: len(received) == 2, what="first events")

            # Restart 1: events written while the watch is disconnected are replayed.
            await asyncio.to_thread(server.stop)
            await eventually(lambda: bool(reconnect_waits), what="watch notices the outage")
            await asyncio.to_thread(server.start)
            await writer.put("w/2", b"2")
            await writer.delete("w/1")
            gate.set()
            await writer.put("w/3", b"3")
            await eventually(lambda: len(received) == 5, what="events after restart 1")

            # Restart 2: nothing written while down; nothing may be replayed twice.
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            await writer.put("w/4", b"4")
            await eventually(lambda: len(received) == 6, what="events after restart 2")
            await writer.put("w/end", b"")
            await eventually(lambda: len(received) == 7, what="sentinel")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert [(e.type, e.key, e.value) for e in received] == [
        (PUT, "w/0", b"0"), (PUT, "w/1", b"1"),
        (PUT, "w/2", b"2"), (DELETE, "w/1", b""), (PUT, "w/3", b"3"),
        (PUT, "w/4", b"4"), (PUT, "w/end", b""),
    ]
    revisions = [e.revision for e in received]
    assert revisions == sorted(set(revisions))  # strictly increasing: no duplicate
    assert len(reconnect_waits) >= 2


async def test_requests_fail_clearly_while_down_and_recover(server: EtcdServer) -> None:
    policy = BackoffPolicy(base=0.02, cap=0.1, max_attempts=4)
    async with EtcdStore(server.endpoint, backoff=policy) as store:
        await store.put("k", b"before")
        await asyncio.to_thread(server.stop)
        with pytest.raises(StoreUnavailable) as info:
            await store.get("k")
        assert str(info.value) == (
            f"etcd at {server.endpoint} is unreachable after 4 attempts: connection refused")
        await asyncio.to_thread(server.start)
        kv = await store.get("k")  # the same store object works again
        assert kv is not None and kv.value == b"before"


async def test_unreachable_etcd_gives_up_in_bounded_time() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    policy = BackoffPolicy()  # the defaults users get
    async with EtcdStore(endpoint) as store:
        operations = (
            lambda: store.get("k"), lambda: store.create("k", b"v"), lambda: store.grant_lease(10))
        for operation in operations:
            began = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                await operation()
            assert time.monotonic() - began < policy.worst_case_sleep() + 1.0
            assert str(info.value) == (
                f"etcd at {endpoint} is unreachable after 5 attempts: connection refused")


async def test_failover_to_the_next_endpoint(server: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with EtcdStore([dead, server.endpoint]) as store:
        rev = await store.put("f/1", b"x")
        assert (await store.get("f/1")).mod_revision == rev  # type: ignore[union-attr]
        assert await store.create("f/2", b"y") is True


async def test_unix_socket_endpoint(server: EtcdServer) -> None:
    assert server.socket_path is not None
    async with EtcdStore(f"unix://{server.socket_path}") as store:
        await store.put("u/1", b"over a unix socket")
        listing = await store.list("u/")
    assert [kv.value for kv in listing.items] == [b"over a unix socket"]


async def test_concurrent_create_from_two_processes(server: EtcdServer) -> None:
    async with EtcdStore(server.endpoint) as store:
        wins = await race_create(server.endpoint)
        await check_one_winner_per_key(store, wins)
