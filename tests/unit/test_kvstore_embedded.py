"""What only the embedded store has to prove: persistence, several processes on one
file, bounded history, lease expiry on its own clock."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from contextlib import aclosing
from pathlib import Path

import pytest

from villi.errors import StoreError
from villi.kvstore import Compacted, EmbeddedStore, EtcdStore, EventType, open_store
from villi.testing.kvstore import check_one_winner_per_key, race_create, take

PUT, DELETE = EventType.PUT, EventType.DELETE


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def run_python(code: str, *args: str, timeout: float = 20.0) -> str:
    """Run ``code`` in a separate Python process; its stdout (fails on non-zero exit)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(code), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_state_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    async with EmbeddedStore(path) as store:
        first = await store.put("villi/state/nodes/v1/n1", b"node-1")
        await store.put("villi/state/nodes/v1/n2", b"node-2")
        lease = await store.grant_lease(3600)
        await store.put("villi/state/ip/v1/10.0.0.1", b"ep", lease=lease)
        last = await store.delete("villi/state/nodes/v1/n2") and await store.revision()
    async with EmbeddedStore(path) as store:
        assert await store.revision() == last
        assert [kv.key for kv in (await store.list("villi/state/")).items] == [
            "villi/state/ip/v1/10.0.0.1", "villi/state/nodes/v1/n1"]
        assert await store.keep_alive(lease) is True  # leases persist too
        assert await store.put("villi/x", b"") == last + 1  # revisions continue
        async with aclosing(store.watch("villi/state/nodes/", first)) as watch:
            history = await take(watch, 3)
    assert [(e.type, e.key) for e in history] == [
        (PUT, "villi/state/nodes/v1/n1"), (PUT, "villi/state/nodes/v1/n2"),
        (DELETE, "villi/state/nodes/v1/n2")]


WRITER = """
import asyncio, sys
from villi.kvstore import EmbeddedStore

async def main(path):
    async with EmbeddedStore(path) as store:
        await store.put("villi/resources/policy/default/a", b"v1")
        await store.put("villi/resources/policy/default/b", b"v1")
        assert await store.create("villi/resources/policy/default/a", b"no") is False
        await store.delete("villi/resources/policy/default/a")
        print(await store.revision())

asyncio.run(main(sys.argv[1]))
"""


async def test_other_process_writes_reach_watch(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with EmbeddedStore(path) as agent:
        start = await agent.revision() + 1
        async with aclosing(agent.watch("villi/resources/", start)) as watch:
            pending = asyncio.ensure_future(take(watch, 3))
            last = int(await run_python(WRITER, str(path)))  # the "villi apply" process
            events = await pending
    assert [(e.type, e.key, e.value) for e in events] == [
        (PUT, "villi/resources/policy/default/a", b"v1"),
        (PUT, "villi/resources/policy/default/b", b"v1"),
        (DELETE, "villi/resources/policy/default/a", b""),
    ]
    assert events[-1].revision == last


WATCHER = """
import asyncio, json, sys
from contextlib import aclosing
from villi.kvstore import EmbeddedStore

async def main(path, start, count):
    async with EmbeddedStore(path) as store:
        async with aclosing(store.watch("villi/state/", int(start))) as events:
            print("ready", flush=True)
            out = []
            async for event in events:
                out.append([event.type.value, event.key, event.value.decode()])
                if len(out) == int(count):
                    break
        print(json.dumps(out), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_watch_in_other_process_sees_our_writes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with EmbeddedStore(path) as cli:
        start = await cli.revision() + 1
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WATCHER, str(path), str(start), "3",
            stdout=asyncio.subprocess.PIPE)
        try:
            assert agent.stdout is not None
            # Write once the other process is up: the changes reach it through its
            # cross-process poll (or, if it is slower, through the replay from `start`).
            assert await asyncio.wait_for(agent.stdout.readline(), 20) == b"ready\n"
            lease = await cli.grant_lease(60)
            await cli.put("villi/state/nodes/v1/default/n1", b"n1", lease=lease)
            await cli.put("villi/state/ip/v1/default/10.64.0.5", b"ep", lease=lease)
            await cli.revoke_lease(lease)
            out, _ = await asyncio.wait_for(agent.communicate(), 20)
        finally:
            if agent.returncode is None:
                agent.kill()
                await agent.wait()
    assert json.loads(out) == [
        ["put", "villi/state/nodes/v1/default/n1", "n1"],
        ["put", "villi/state/ip/v1/default/10.64.0.5", "ep"],
        ["delete", "villi/state/ip/v1/default/10.64.0.5", ""],  # revoke: sorted by key
    ]


async def test_concurrent_create_from_two_processes(tmp_path: Path) -> None:
    url = f"embedded://{tmp_path / 'race.db'}"
    async with open_store(url) as store:
        await store.revision()  # create the file before the racers open it
        await check_one_winner_per_key(store, await race_create(url))


async def test_lease_expiry_follows_the_store_clock() -> None:
    clock = FakeClock()
    async with EmbeddedStore(None, clock=clock) as store:
        lease = await store.grant_lease(10)
        rev = await store.put("n/1", b"x", lease=lease)
        clock.now += 9
        assert await store.keep_alive(lease) is True  # now expires at +19
        clock.now += 9.5
        assert await store.get("n/1") is not None
        clock.now += 1
        assert await store.get("n/1") is None  # expired lazily, on access
        async with aclosing(store.watch("n/", rev)) as watch:
            events = await take(watch, 2)
        assert [(e.type, e.key) for e in events] == [(PUT, "n/1"), (DELETE, "n/1")]
        assert await store.keep_alive(lease) is False
        with pytest.raises(StoreError, match="not found or expired"):
            await store.put("n/2", b"x", lease=lease)


async def test_history_is_bounded(tmp_path: Path) -> None:
    async with EmbeddedStore(tmp_path / "h.db", history=10) as store:
        for i in range(50):
            await store.put(f"k/{i % 3}", str(i).encode())
        current = await store.revision()
        with pytest.raises(Compacted) as info:
            async with aclosing(store.watch("k/", 2)) as watch:
                await take(watch, 1)
        oldest = info.value.compact_revision
        assert current - 11 <= oldest <= current - 9 + 1  # about `history` kept
        async with aclosing(store.watch("k/", current - 9)) as watch:
            assert len(await take(watch, 10)) == 10


async def test_watch_ends_when_store_closes() -> None:
    store = EmbeddedStore(None)
    watch = store.watch("a/", 1)
    pending = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0.05)
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await pending
    with pytest.raises(StoreError, match="closed"):
        await store.get("a")


async def test_open_store_urls(tmp_path: Path) -> None:
    async with open_store("memory://") as s:
        assert isinstance(s, EmbeddedStore) and s.path is None
    async with open_store(f"embedded://{tmp_path}/x.db") as s:
        assert isinstance(s, EmbeddedStore) and s.path == f"{tmp_path}/x.db"
    async with open_store("http://127.0.0.1:2379,http://127.0.0.1:22379") as s:
        assert isinstance(s, EtcdStore) and len(s.endpoints) == 2
    async with open_store(["127.0.0.1:2379", "unix:///run/etcd.sock"]) as s:
        assert isinstance(s, EtcdStore)
        assert s.endpoints == ["http://127.0.0.1:2379", "unix:///run/etcd.sock"]
    with pytest.raises(ValueError, match="unknown kvstore URL"):
        open_store("zookeeper://x")
