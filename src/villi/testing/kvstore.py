"""Test seams for code that uses the kvstore.

``memory_store()`` is the in-memory store other packages' unit tests should use instead
of writing their own fake: it is the real embedded backend, so tests exercise the same
revision, watch and lease semantics as production. ``take`` and ``eventually`` read
watches and wait for conditions with a deadline instead of fixed sleeps.
``FlakyStore`` wraps a store and breaks its watches on demand, to test resync paths.
``race_create`` makes two OS processes race create-if-absent on the same keys.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from contextlib import aclosing
from typing import TypeVar

from villi.errors import StoreUnavailable
from villi.kvstore.embedded import EmbeddedStore
from villi.kvstore.store import KeyValue, LeaseID, ListResult, Store, TxnOp, WatchEvent

T = TypeVar("T")


def memory_store(**options: object) -> EmbeddedStore:
    """A fresh in-memory store (``async with memory_store() as store: ...``)."""
    return EmbeddedStore(None, **options)  # type: ignore[arg-type]


async def take(events: AsyncIterator[T], count: int, timeout: float = 10.0) -> list[T]:
    """The next ``count`` items of ``events``; TimeoutError if they do not all come."""
    out: list[T] = []
    async with asyncio.timeout(timeout):
        while len(out) < count:
            out.append(await anext(events))
    return out


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, what: str = ""
) -> None:
    """Wait until ``check()`` is true, polling with a growing interval."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {what or check}")
        await asyncio.sleep(delay)
        delay = min(0.1, delay * 2)


class DelegatingStore(Store):
    """Forwards every call to ``inner``: subclass it and override the calls to tamper
    with (inject failures, run hooks at chosen moments)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def watch(
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncGenerator[WatchEvent, None]:
        return self.inner.watch(prefix, start_revision)

    async def get(self, key: str) -> KeyValue | None:
        return await self.inner.get(key)

    async def put(self, key: str, value: bytes, lease: LeaseID | None = None) -> int:
        return await self.inner.put(key, value, lease)

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def delete_prefix(self, prefix: str) -> int:
        return await self.inner.delete_prefix(prefix)

    async def list(self, prefix: str) -> ListResult:
        return await self.inner.list(prefix)

    async def create(self, key: str, value: bytes, lease: LeaseID | None = None) -> bool:
        return await self.inner.create(key, value, lease)

    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease: LeaseID | None = None
    ) -> bool:
        return await self.inner.compare_and_swap(key, expected_mod_revision, value, lease)

    async def compare_and_delete(self, key: str, expected_mod_revision: int) -> bool:
        return await self.inner.compare_and_delete(key, expected_mod_revision)

    async def grant_lease(self, ttl_seconds: int) -> LeaseID:
        return await self.inner.grant_lease(ttl_seconds)

    async def keep_alive(self, lease: LeaseID) -> bool:
        return await self.inner.keep_alive(lease)

    async def revoke_lease(self, lease: LeaseID) -> None:
        await self.inner.revoke_lease(lease)

    async def revision(self) -> int:
        return await self.inner.revision()

    async def commit(self, ops: Sequence[TxnOp], expect: Mapping[str, int]) -> int | None:
        return await self.inner.commit(ops, expect)

    async def compact(self, revision: int) -> None:
        await self.inner.compact(revision)

    async def close(self) -> None:
        """The inner store belongs to the caller: not closed here."""


class FlakyStore(DelegatingStore):
    """Delegates to ``inner``; while ``broken`` is True, open watches raise
    :class:`StoreUnavailable` at their next event (that event is lost to the reader,
    as when a connection dies) and new watches fail at once."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.broken = False
        self.watch_failures = 0

    def _fail(self) -> StoreUnavailable:
        self.watch_failures += 1
        return StoreUnavailable("injected watch failure")

    async def watch(  # type: ignore[override]
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncGenerator[WatchEvent, None]:
        if self.broken:
            raise self._fail()
        async with aclosing(self.inner.watch(prefix, start_revision)) as events:
            async for event in events:
                if self.broken:
                    raise self._fail()
                yield event


_RACER = """
import asyncio, json, sys
from villi.kvstore import open_store

async def main(url, me, count):
    async with open_store(url) as store:
        await store.revision()  # connected (and file opened) before the start
        print("ready", flush=True)
        sys.stdin.readline()  # the starting gun: every racer starts from here
        won = [k for k in range(count) if await store.create(f"race/{k}", me.encode())]
        print(json.dumps(won), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def race_create(url: str, keys: int = 40, racers: int = 2) -> dict[str, list[int]]:
    """``racers`` OS processes open ``url`` and, released at the same moment, each try
    ``create("race/<k>")`` for k < ``keys``; returns which keys each racer won.
    The processes are killed if anything goes wrong."""
    names = [f"p{i}" for i in range(1, racers + 1)]
    procs: list[asyncio.subprocess.Process] = []
    try:
        for name in names:
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-c", _RACER, url, name, str(keys),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE))
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if line != b"ready\n":
                raise RuntimeError(f"racer did not start: {line!r}")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        outs = [await asyncio.wait_for(proc.communicate(), 30) for proc in procs]
        if any(proc.returncode for proc in procs):
            raise RuntimeError(f"a racer failed: {[p.returncode for p in procs]}")
        return {name: json.loads(out[0]) for name, out in zip(names, outs, strict=True)}
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def check_one_winner_per_key(
    store: Store, wins: dict[str, list[int]], keys: int = 40
) -> None:
    """Every key was won by exactly one racer, and holds that racer's value."""
    assert sorted(k for won in wins.values() for k in won) == list(range(keys)), wins
    for name, won in wins.items():
        for k in won:
            kv = await store.get(f"race/{k}")
            assert kv is not None and kv.value == name.encode(), (k, kv)
