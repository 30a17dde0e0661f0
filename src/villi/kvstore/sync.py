"""List-then-watch and lease keep-alive: the two loops every store user needs.

``watch_prefix`` is how the agent follows a prefix (nodes, identities, policies): it
lists, hands over the snapshot as PUT events, then watches from the listing's revision
+ 1, so it sees every later change exactly once. When the watch falls behind compaction
it lists again and hands over only the difference (PUTs for new or changed keys,
DELETEs for keys that vanished), so consumers never rebuild their state from scratch.
Every retry backs off with full jitter (Cilium's ListAndWatch learned this the hard way,
cilium#22037).

``LeaseKeeper`` keeps one lease alive, a keep-alive every third of its TTL or a little
sooner: each period is drawn uniformly from ``[(1 - period_jitter) * ttl/3, ttl/3]`` so
that agents whose keep-alives fell into step (after an etcd restart, a rollout) drift
apart again instead of hitting etcd together every ttl/3 for ever. When the lease was lost
anyway (etcd unreachable for longer than the TTL, a revoke by someone else) it grants a
new one and calls ``on_lost(new_lease)`` so the owner re-writes the keys that lived
under the old one (Cilium's ``handleExpiredLease``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing

from villi.errors import StoreError
from villi.kvstore.backoff import Backoff, BackoffPolicy, SleepFn, UniformSource
from villi.kvstore.store import Compacted, EventType, LeaseID, Store, WatchEvent

log = logging.getLogger(__name__)

#: list-then-watch retries forever (an agent must catch up when the store is back).
RESYNC_BACKOFF = BackoffPolicy(base=0.1, cap=30.0, max_attempts=None)
#: keep-alive retries; the cap is further limited to a third of the lease's TTL.
KEEPALIVE_BACKOFF = BackoffPolicy(base=0.1, cap=5.0, max_attempts=None)


class PrefixSync:
    """Follows ``prefix`` of ``store``: iterate it for snapshot, changes and resyncs.

    ``synced`` is set once the consumer has taken every event of the first snapshot
    (when it asks for the next one), so a task that garbage-collects stale local state
    can wait for it. ``revision`` is the revision the
    consumer is up to date with. ``known`` maps each key the consumer has been told
    about to its mod revision; that is what resyncs are diffed against.
    """

    def __init__(
        self,
        store: Store,
        prefix: str,
        *,
        backoff: BackoffPolicy = RESYNC_BACKOFF,
        rng: UniformSource | None = None,
        sleep: SleepFn | None = None,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.synced = asyncio.Event()
        self.revision = 0
        self.known: dict[str, int] = {}
        self._backoff = Backoff(backoff, rng=rng, sleep=sleep)

    def __aiter__(self) -> AsyncGenerator[WatchEvent, None]:
        return self._run()

    async def _run(self) -> AsyncGenerator[WatchEvent, None]:
        need_list = True
        while True:
            try:
                if need_list:
                    for event in await self._resync():
                        yield event
                    self.synced.set()
                    need_list = False
                async with aclosing(self.store.watch(self.prefix, self.revision + 1)) as watch:
                    async for event in watch:
                        self._apply(event)
                        self._backoff.reset()
                        yield event
                return  # the store was closed
            except Compacted as exc:
                log.info("watch of %r compacted (%s); listing again", self.prefix, exc)
                need_list = True
            except StoreError as exc:
                # Nothing was lost: the next watch resumes from self.revision + 1.
                log.warning("watch of %r failed: %s; retrying", self.prefix, exc)
            if not await self._backoff.failed():
                raise StoreError(f"gave up following {self.prefix!r}")  # bounded policy only

    async def _resync(self) -> Iterator[WatchEvent]:
        """List the prefix and turn it into the events that bring ``known`` up to date.

        The events are made one at a time as the consumer takes them, and each listed
        entry is dropped once handed over: an agent's first listing is 350,000 entries
        at the seed's scale (bench/scale.py), and holding it twice (entries and events)
        at once was the largest transient allocation of its start-up."""
        listing = await self.store.list(self.prefix)
        old = self.known
        items = listing.items
        self.known = {kv.key: kv.mod_revision for kv in items}
        self.revision = revision = listing.revision
        gone = sorted(old.keys() - self.known.keys())

        def events() -> Iterator[WatchEvent]:
            for key in gone:
                yield WatchEvent(EventType.DELETE, key, b"", revision)
            for i, kv in enumerate(items):
                items[i] = None  # type: ignore[call-overload]  # free as we go
                if old.get(kv.key) != kv.mod_revision:
                    yield WatchEvent(EventType.PUT, kv.key, kv.value, kv.mod_revision)

        return events()

    def _apply(self, event: WatchEvent) -> None:
        if event.type is EventType.DELETE:
            self.known.pop(event.key, None)
        else:
            self.known[event.key] = event.revision
        self.revision = event.revision


def watch_prefix(
    store: Store, prefix: str, *, backoff: BackoffPolicy = RESYNC_BACKOFF
) -> AsyncGenerator[WatchEvent, None]:
    """Snapshot (as PUTs), then every change, of ``prefix``; survives compaction and
    outages (see :class:`PrefixSync`, which also exposes ``synced``)."""
    return PrefixSync(store, prefix, backoff=backoff).__aiter__()


class LeaseKeeper:
    """Keeps a lease alive; re-grants it and calls ``on_lost`` when it was lost.

    Use as ``async with LeaseKeeper(store, ttl, on_lost=...) as keeper:`` and attach
    keys to ``keeper.lease``; leaving the block stops the task and revokes the lease
    (so the keys go at once instead of after the TTL).
    """

    def __init__(
        self,
        store: Store,
        ttl_seconds: int,
        *,
        on_lost: Callable[[LeaseID], Awaitable[None]] | None = None,
        backoff: BackoffPolicy = KEEPALIVE_BACKOFF,
        period_jitter: float = 0.5,
        rng: UniformSource | None = None,
        sleep: SleepFn | None = None,
    ) -> None:
        if not 0.0 <= period_jitter <= 1.0:
            raise ValueError(f"period_jitter must be within 0..1, got {period_jitter}")
        self.store = store
        self.ttl = ttl_seconds
        self.period_jitter = period_jitter
        self._rng: UniformSource = rng or random.Random()
        #: monotonic time of the last keep-alive etcd answered (None: none yet).
        self.last_ok: float | None = None
        self.on_lost = on_lost
        self.lease: LeaseID | None = None
        self.losses = 0
        self._backoff = Backoff(
            BackoffPolicy(backoff.base, min(backoff.cap, ttl_seconds / 3), backoff.max_attempts),
            rng=self._rng, sleep=sleep)
        self._sleep: SleepFn = sleep or asyncio.sleep
        self._task: asyncio.Task[None] | None = None
        self._owe_callback = False

    async def start(self) -> LeaseID:
        self.lease = await self.store.grant_lease(self.ttl)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"villi-lease-keeper {self.lease}")
        self._task.add_done_callback(self._report_failure)
        return self.lease

    def _report_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("lease keeper of %s stopped: %r", self.lease, task.exception())

    async def _run(self) -> None:
        while True:
            await self._sleep(self.period())
            while True:
                try:
                    await self._refresh()
                    self._backoff.reset()
                    break
                except StoreError as exc:
                    log.warning("keeping lease %s alive failed: %s", self.lease, exc)
                    if not await self._backoff.failed():
                        raise

    def period(self) -> float:
        """The next sleep between keep-alives (see the module docstring)."""
        full = self.ttl / 3
        return self._rng.uniform(full * (1.0 - self.period_jitter), full)

    async def _refresh(self) -> None:
        assert self.lease is not None
        if not self._owe_callback:
            if await self.store.keep_alive(self.lease):
                self.last_ok = time.monotonic()
                return
            lost = self.lease
            self.lease = await self.store.grant_lease(self.ttl)
            self.losses += 1
            self._owe_callback = True
            log.warning("lease %s was lost; re-granted as %s", lost, self.lease)
        if self.on_lost is not None:
            # Retried (with backoff) until it succeeds: the keys must come back.
            await self.on_lost(self.lease)
        self._owe_callback = False

    async def stop(self, *, revoke: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # (not "await task": our own cancel must propagate)
        if revoke and self.lease is not None:
            with contextlib.suppress(StoreError):
                await self.store.revoke_lease(self.lease)

    async def __aenter__(self) -> LeaseKeeper:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
