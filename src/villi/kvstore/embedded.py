"""The embedded store: etcd's semantics in one SQLite file, for a single node.

Why SQLite: on a single node the ``villi`` CLI writes resources while the agent, a
different process, watches them, so the store must be shared by several processes on
one machine and survive restarts. SQLite in WAL mode gives exactly that: atomic
multi-process transactions, readers that never block the writer, durability, and it
ships with Python. ``path=None`` keeps everything in memory for one process (unit tests,
``villi.testing``).

How watches work across processes: every change appends rows to a revision log
(``_sqlite.py``). A watcher reads the log from its next revision. Writes made through
this object wake local watchers at once; writes by other processes are noticed by a
background task that polls ``PRAGMA data_version`` (a counter SQLite bumps when another
connection commits, read without touching any table) at an adaptive interval: 10 ms
right after a change, doubling to 250 ms while nothing happens.

Leases keep absolute expiry times. Expired leases are removed, with their keys and one
DELETE event per key, lazily by the next operation of any process and by a background
sweep, so keys of a crashed agent disappear even when nobody writes.

The log is bounded (``history`` revisions); a watch that starts before the oldest kept
revision raises :class:`Compacted`, as on etcd.

All SQLite work runs on one worker thread per store, so the asyncio loop never blocks on
disk or on another process holding the write lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from villi.errors import StoreError, StoreUnavailable
from villi.kvstore._sqlite import Database
from villi.kvstore.store import KeyValue, LeaseID, ListResult, Store, TxnOp, WatchEvent

log = logging.getLogger(__name__)
T = TypeVar("T")

# A watch reads the log in windows of this many revisions (bounded memory per read).
_WATCH_WINDOW = 1000


class EmbeddedStore(Store):
    """etcd-like store in a SQLite file (``path``) or in memory (``path=None``).

    ``history``: how many revisions the log keeps for watches to replay.
    ``clock``: wall-clock seconds for lease expiry (injectable for tests).
    ``durable``: fsync every commit (``synchronous=FULL``); False trades the last
    commits on power loss (never on a process crash) for speed.
    ``poll_interval``: the (min, max) interval of the cross-process change poll.
    ``sweep_interval``: mean interval of the background lease-expiry sweep (jittered so
    processes sharing a file do not sweep in lock-step).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        history: int = 10_000,
        clock: Callable[[], float] = time.time,
        durable: bool = True,
        poll_interval: tuple[float, float] = (0.01, 0.25),
        sweep_interval: float = 0.5,
    ) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1 revision, got {history}")
        self.path = os.fspath(path) if path is not None else None
        self._where = f"embedded store {self.path}" if self.path else "in-memory store"
        try:
            self._db = Database(self.path, history=history, clock=clock, durable=durable)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self._where} cannot be opened: {exc}") from exc
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="villi-kvstore")
        self._poll_min, self._poll_max = poll_interval
        self._sweep_interval = sweep_interval
        self._rng = random.Random()
        self._changed = asyncio.Event()
        self._seen_commits = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"EmbeddedStore({self.path!r})"

    # --- plumbing ---------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the worker thread, translating SQLite errors."""
        if self._closed:
            raise StoreError(f"{self._where} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, partial(fn, *args))
        except sqlite3.OperationalError as exc:
            # "database is locked" after busy_timeout, disk full, file removed, ...
            raise StoreUnavailable(f"{self._where} is unusable: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"{self._where}: {exc}") from exc
        finally:
            if self._db.commits != self._seen_commits:
                self._seen_commits = self._db.commits
                self._notify()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._maintain(), name=f"villi-kvstore-maintain {self._where}")
        return await self._call(fn, *args)

    def _notify(self) -> None:
        """Wake every watcher (each re-reads the log from its own next revision)."""
        woken, self._changed = self._changed, asyncio.Event()
        woken.set()

    async def _maintain(self) -> None:
        """Poll for other processes' commits (file stores) and sweep expired leases."""
        loop = asyncio.get_running_loop()
        interval = self._poll_min
        last_version: int | None = None
        next_sweep = loop.time()
        while True:
            await asyncio.sleep(interval)
            interval = min(self._poll_max, interval * 2)
            try:
                if self.path is not None:
                    version = await self._call(self._db.data_version)
                    # The first poll notifies too: a commit may have landed between a
                    # watcher's first read and this poll's baseline.
                    if version != last_version:
                        self._notify()
                        interval = self._poll_min
                    last_version = version
                if loop.time() >= next_sweep:
                    await self._call(self._db.expire_leases)
                    next_sweep = loop.time() + self._sweep_interval * self._rng.uniform(0.5, 1.5)
            except StoreError as exc:
                if self._closed:
                    return
                log.warning("%s: background poll failed: %s", self._where, exc)
                interval = self._poll_max

    # --- Store ---------------------------------------------------------------------------

    async def revision(self) -> int:
        return await self._run(self._db.revision)

    async def get(self, key: str) -> KeyValue | None:
        return await self._run(self._db.get, key)

    async def put(self, key: str, value: bytes, lease: LeaseID | None = None) -> int:
        return await self._run(self._db.put, key, bytes(value), lease)

    async def delete(self, key: str) -> bool:
        return await self._run(self._db.delete, key)

    async def delete_prefix(self, prefix: str) -> int:
        return await self._run(self._db.delete_prefix, prefix)

    async def list(self, prefix: str) -> ListResult:
        return await self._run(self._db.list_prefix, prefix)

    async def create(self, key: str, value: bytes, lease: LeaseID | None = None) -> bool:
        return await self._run(self._db.compare_and_swap, key, 0, bytes(value), lease)

    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease: LeaseID | None = None
    ) -> bool:
        return await self._run(
            self._db.compare_and_swap, key, expected_mod_revision, bytes(value), lease)

    async def compare_and_delete(self, key: str, expected_mod_revision: int) -> bool:
        return await self._run(self._db.compare_and_delete, key, expected_mod_revision)

    async def commit(self, ops: Sequence[TxnOp], expect: Mapping[str, int]) -> int | None:
        return await self._run(self._db.commit, list(ops), dict(expect))

    async def grant_lease(self, ttl_seconds: int) -> LeaseID:
        if ttl_seconds < 1:
            raise ValueError(f"lease TTL must be >= 1 s, got {ttl_seconds}")
        return await self._run(self._db.grant_lease, int(ttl_seconds))

    async def keep_alive(self, lease: LeaseID) -> bool:
        return await self._run(self._db.keep_alive, lease)

    async def revoke_lease(self, lease: LeaseID) -> None:
        await self._run(self._db.revoke_lease, lease)

    async def compact(self, revision: int) -> None:
        await self._run(self._db.compact, revision)

    async def watch(
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncGenerator[WatchEvent, None]:
        next_rev = start_revision
        if next_rev is None or next_rev <= 0:
            next_rev = await self._run(self._db.revision) + 1
        while not self._closed:
            changed = self._changed  # taken before the read: no wake-up can be lost
            events, upto = await self._run(self._db.events, prefix, next_rev, _WATCH_WINDOW)
            for event in events:
                yield event
            if upto >= next_rev:
                next_rev = upto + 1
            else:
                await changed.wait()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._notify()  # watchers wake up, see the store closed and finish
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        # Let queued SQLite calls finish before closing the connection under them.
        await asyncio.to_thread(self._executor.shutdown, True)
        self._db.close()
