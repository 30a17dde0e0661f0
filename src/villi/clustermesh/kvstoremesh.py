"""``villi kvstoremesh``: cache every remote cluster's state in the local kvstore.

One process per cluster. For each remote cluster it follows that cluster's kvstore
(:func:`villi.clustermesh.remote.follow_remote`: its cluster config, then list+watch of
nodes, ipcache, identities and Service resources, with full-jitter backoff on every
reconnect) and mirrors what it sees into the *local* kvstore under
``villi/cache/<kind>/v1/<remote>/…``, all under its own lease. When the initial listing
of a kind is complete it writes the sync canary ``villi/synced/<remote>/<kind>``, and it
publishes whether it can reach each remote at ``villi/cluster-status/<remote>``.

So agents read only their local kvstore: a remote cluster whose kvstore fails is seen by
one client per cluster (this process) instead of by every agent, and the agents keep the
last cached state (Cilium's KVStoreMesh; fault isolation, docs/clustermesh.md).

Restarts: at start the process lists what an earlier run cached; a cached key that a
remote's fresh listing no longer has is deleted before that kind's canary is written,
so nothing stale survives a restart and nothing live is ever withdrawn in between (the
agents see the same values re-written under the new lease). ``cache_expiry`` (seconds,
None = never, Cilium's ``cacheTTL`` default) withdraws a remote's cache after it has been
unreachable that long.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from villi.clustermesh import keys
from villi.clustermesh.ids import ClusterInfo
from villi.clustermesh.remote import follow_remote
from villi.clustermesh.validate import check_config, check_identity, check_ipcache
from villi.errors import StoreError
from villi.kvstore import LeaseID, LeaseKeeper, Store, TxnOp, open_store
from villi.kvstore.backoff import Backoff, BackoffPolicy

log = logging.getLogger(__name__)

#: Retries of a write to the local kvstore (it may be restarting): full jitter.
LOCAL_WRITE_BACKOFF = BackoffPolicy(base=0.1, cap=5.0, max_attempts=None)
#: Cache writes per local transaction (etcd refuses more than ``--max-txn-ops``, 128).
TXN_OPS = 100
#: Bytes of values per local transaction (etcd's ``--max-request-bytes`` is 1.5 MiB).
TXN_BYTES = 512 * 1024
#: Transactions in flight at once.
TXNS_IN_FLIGHT = 4
#: Distinct cache keys taken from the queue per round.
WRITE_BATCH = TXN_OPS * TXNS_IN_FLIGHT


@dataclass
class _Mirror:
    """What this process has cached of one remote cluster."""

    name: str
    values: dict[str, bytes] = field(default_factory=dict)      # cache key -> value
    stale: dict[str, set[str]] = field(default_factory=dict)    # kind -> old cache keys
    synced: set[str] = field(default_factory=set)
    config: bytes | None = None
    info: ClusterInfo | None = None      # parsed ``config``: checked once, used per key
    connected: bool = False
    error: str | None = "not connected yet"
    since: float = field(default_factory=time.time)
    rejected: int = 0


class KVStoreMesh:
    """Mirror ``remotes`` ({name: kvstore URL}) into ``store`` (the local kvstore)."""

    def __init__(self, store: Store, local: ClusterInfo, remotes: dict[str, str], *,
                 lease_ttl: int = 900, cache_expiry: float | None = None,
                 opener: Callable[[str], Store] = open_store,
                 probe_interval: float = 2.0) -> None:
        if local.id == 0:
            raise ValueError("a cluster in a mesh needs a cluster id between 1 and "
                             f"{local.max_connected}")
        for name in remotes:
            if name == local.name:
                raise ValueError(f"--remote {name} is this cluster")
        self.store = store
        self.local = local
        self.remotes = dict(remotes)
        self.lease_ttl = lease_ttl
        self.cache_expiry = cache_expiry
        self.opener = opener
        self.probe_interval = probe_interval
        self.mirrors = {name: _Mirror(name) for name in remotes}
        self.lease: LeaseKeeper | None = None
        self.ready = asyncio.Event()
        self._pending: dict[str, bytes | None] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._busy = False

    # --- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        await self._write(keys.cluster_config_key(self.local.name),
                          json.dumps(self.local.config()).encode(), lease=False)
        self.lease = LeaseKeeper(self.store, self.lease_ttl, on_lost=self._lease_lost)
        await self.lease.start()
        try:
            await self._load_previous()
            self.ready.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._writer())
                for name, url in self.remotes.items():
                    tg.create_task(self._follow(name, url))
                if self.cache_expiry:
                    tg.create_task(self._expire())
        finally:
            await self.lease.stop(revoke=False)   # a restart keeps the cache

    async def _load_previous(self) -> None:
        """Cache keys an earlier run left: deleted unless a fresh listing has them."""
        for name, mirror in self.mirrors.items():
            for kind in keys.KINDS:
                listing = await self.store.list(kind.cache_prefix(name))
                mirror.stale[kind.name] = {kv.key for kv in listing.items}

    async def _follow(self, name: str, url: str) -> None:
        remote = self.opener(url)
        mirror = self.mirrors[name]
        try:
            await follow_remote(
                remote, name, self.local,
                on_config=lambda raw: self._config(mirror, raw),
                on_event=lambda kind, rest, value: self._event(mirror, kind, rest, value),
                on_synced=lambda kind: self._spawn_synced(mirror, kind),
                on_connected=lambda ok, why: self._connected(mirror, ok, why),
                probe_interval=self.probe_interval)
        finally:
            await remote.close()

    # --- remote → local ------------------------------------------------------------------------
    async def _config(self, mirror: _Mirror, raw: bytes) -> None:
        info, why = check_config(mirror.name, raw, local=self.local)
        if info is None:   # follow_remote checked already; keep the belt and braces
            raise ConnectionError(why)
        cfg = info.config()
        cfg["capabilities"]["cached"] = True   # type: ignore[index]
        mirror.config = json.dumps(cfg).encode()
        mirror.info = info
        await self._write(keys.cluster_config_key(mirror.name), mirror.config)

    async def _event(self, mirror: _Mirror, kind: keys.Kind, rest: str, value: bytes | None
                     ) -> None:
        key = kind.cache_prefix(mirror.name) + rest
        mirror.stale.get(kind.name, set()).discard(key)
        if value is not None and not self._valid(mirror, kind, rest, value):
            value = None   # rejected: whatever was cached under that key goes too
        if value is None:
            if mirror.values.pop(key, None) is not None or kind.name not in mirror.synced:
                await self._queue(key, None)
            return
        if mirror.values.get(key) == value:
            return
        mirror.values[key] = value
        await self._queue(key, value)

    # The cache is written through a queue: changes to one key coalesce (the last value
    # wins) and distinct keys are written TXN_OPS to a transaction, TXNS_IN_FLIGHT
    # transactions at a time, so an initial listing of 100,000 keys costs about a
    # thousand local round trips instead of 100,000 (and as many revisions, which every
    # agent's watch would replay). A canary is written only after everything queued
    # before it is in the local kvstore (:meth:`_flush`).
    async def _queue(self, key: str, value: bytes | None) -> None:
        self._pending[key] = value
        self._wake.set()
        if len(self._pending) > 8 * WRITE_BATCH:
            await self._flush()   # back-pressure: the remote listing waits for us

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._busy = True
            while self._pending:
                batch = list(self._pending.items())[:WRITE_BATCH]
                for key, _ in batch:
                    del self._pending[key]
                await asyncio.gather(*(self._commit(part) for part in _split(batch)))
            self._busy = False
            self._idle.set()
            self._idle = asyncio.Event()

    async def _flush(self) -> None:
        while self._pending or self._busy:
            idle = self._idle
            self._wake.set()
            await idle.wait()

    def _valid(self, mirror: _Mirror, kind: keys.Kind, rest: str, value: bytes) -> bool:
        info = mirror.info
        if info is None:
            return False
        why: str | None = None
        if kind is keys.IDENTITIES:
            try:
                _, why = check_identity(info, int(rest), value)
            except ValueError:
                why = "identity key is not a number"
        elif kind is keys.IPCACHE:
            _, why = check_ipcache(info, rest, value)
        if why is None:
            return True
        mirror.rejected += 1
        log.warning("not caching %s %s of cluster %s: %s", kind.name, rest, mirror.name, why)
        return False

    def _spawn_synced(self, mirror: _Mirror, kind: str) -> None:
        asyncio.get_running_loop().create_task(self._synced(mirror, kind))

    async def _synced(self, mirror: _Mirror, kind: str) -> None:
        """The first listing of ``kind`` is cached: drop leftovers, write the canary."""
        for key in sorted(mirror.stale.pop(kind, set())):
            await self._queue(key, None)
        await self._flush()
        mirror.synced.add(kind)
        await self._write(keys.synced_key(mirror.name, keys.KIND_BY_NAME[kind]),
                          json.dumps({"time": time.time()}).encode())
        log.info("cluster %s: %s synced (%d keys cached)", mirror.name, kind,
                 sum(1 for k in mirror.values
                     if k.startswith(keys.KIND_BY_NAME[kind].cache_prefix(mirror.name))))

    def _connected(self, mirror: _Mirror, ok: bool, why: str | None) -> None:
        if ok == mirror.connected and (ok or why == mirror.error):
            return
        if ok != mirror.connected:
            mirror.since = time.time()
            if ok:
                log.info("cluster %s reachable", mirror.name)
            else:
                log.warning("cluster %s unreachable: %s (keeping its cached state)",
                            mirror.name, why)
        mirror.connected, mirror.error = ok, None if ok else why
        asyncio.get_running_loop().create_task(self._write_status(mirror))

    async def _write_status(self, mirror: _Mirror) -> None:
        await self._write(keys.CLUSTER_STATUS + mirror.name, json.dumps(
            {"connected": mirror.connected, "error": mirror.error,
             "since": mirror.since}).encode())

    async def _expire(self) -> None:
        """Withdraw the cache of a remote unreachable for longer than ``cache_expiry``."""
        assert self.cache_expiry
        while True:
            await asyncio.sleep(min(self.cache_expiry / 4, 5.0))
            now = time.time()
            for mirror in self.mirrors.values():
                if mirror.connected or now - mirror.since < self.cache_expiry:
                    continue
                if not mirror.values and not mirror.synced:
                    continue
                log.warning("cluster %s unreachable for %.0f s (> --cache-expiry): "
                            "withdrawing its cached state", mirror.name, now - mirror.since)
                for kind in keys.KINDS:
                    await self._delete_prefix(kind.cache_prefix(mirror.name))
                    await self._delete(keys.synced_key(mirror.name, kind))
                mirror.values.clear()
                mirror.synced.clear()

    # --- local writes, retried -------------------------------------------------------------------
    @property
    def _lease(self) -> LeaseID | None:
        return self.lease.lease if self.lease is not None else None

    async def _retry(self, what: str, op: Callable[[], Any]) -> None:
        backoff = Backoff(LOCAL_WRITE_BACKOFF)
        while True:
            try:
                await op()
                return
            except StoreError as exc:
                log.warning("local kvstore: %s failed: %s; retrying", what, exc)
                await backoff.failed()

    async def _write(self, key: str, value: bytes, *, lease: bool = True) -> None:
        await self._retry(f"writing {key}", lambda: self.store.put(
            key, value, lease=self._lease if lease else None))

    async def _commit(self, batch: list[tuple[str, bytes | None]]) -> None:
        """Puts (under the current lease, read at each attempt) and deletes, at once."""
        await self._retry(f"writing {len(batch)} cache keys", lambda: self.store.commit(
            [TxnOp(key, value, self._lease if value is not None else None)
             for key, value in batch], {}))

    async def _delete(self, key: str) -> None:
        await self._retry(f"deleting {key}", lambda: self.store.delete(key))

    async def _delete_prefix(self, prefix: str) -> None:
        await self._retry(f"deleting {prefix}", lambda: self.store.delete_prefix(prefix))

    async def _lease_lost(self, lease: LeaseID) -> None:
        """Our lease expired (the local kvstore was away longer than its TTL): write
        every cached key, canary, config and status again under the new one."""
        for mirror in self.mirrors.values():
            if mirror.config is not None:
                await self._write(keys.cluster_config_key(mirror.name), mirror.config)
            for key, value in list(mirror.values.items()):
                await self._queue(key, value)
            await self._flush()
            for kind in mirror.synced:
                await self._write(keys.synced_key(mirror.name, keys.KIND_BY_NAME[kind]),
                                  json.dumps({"time": time.time()}).encode())
            await self._write_status(mirror)

    # --- views -----------------------------------------------------------------------------------
    def view(self) -> list[dict[str, Any]]:
        return [{"name": m.name, "connected": m.connected, "error": m.error,
                 "synced": sorted(m.synced), "cached": len(m.values), "rejected": m.rejected}
                for m in self.mirrors.values()]


def _split(batch: list[tuple[str, bytes | None]]) -> list[list[tuple[str, bytes | None]]]:
    """``batch`` in transactions of at most TXN_OPS writes and TXN_BYTES of values (a
    single larger value goes alone: etcd's own limit then decides)."""
    parts: list[list[tuple[str, bytes | None]]] = [[]]
    size = 0
    for key, value in batch:
        length = len(key) + len(value or b"")
        if parts[-1] and (len(parts[-1]) >= TXN_OPS or size + length > TXN_BYTES):
            parts.append([])
            size = 0
        parts[-1].append((key, value))
        size += length
    return [part for part in parts if part]


async def run_kvstoremesh(local_url: str, local: ClusterInfo, remotes: dict[str, str], *,
                          lease_ttl: int = 900, cache_expiry: float | None = None) -> None:
    store = open_store(local_url)
    try:
        await KVStoreMesh(store, local, remotes, lease_ttl=lease_ttl,
                          cache_expiry=cache_expiry).run()
    finally:
        await store.close()
