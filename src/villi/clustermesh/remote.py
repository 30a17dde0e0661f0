"""The agent's view of the remote clusters: validated state in, datapath changes out.

:class:`RemoteClusters` holds, per remote cluster, what that cluster shares (its
identities, pods' ipcache entries, nodes and Service resources), each item checked
against the cluster's name and identity range first (:mod:`villi.clustermesh.validate`;
a rejected item is logged with its reason and dropped). It pushes every accepted change
into a :class:`MeshSink` — the agent's identity cache, ipcache map, routes and service
table — so this module knows nothing of the agent.

Where the state comes from is a *source*:

- :class:`CachedSource` (kvstoremesh mode, the default): the local kvstore's
  ``villi/cache/`` prefix and canaries, written by ``villi kvstoremesh``. The agent never
  connects to another cluster's kvstore.
- :class:`DirectSource` (``--clustermesh-mode direct``, for comparison): one connection
  per remote kvstore per agent, as Cilium did before KVStoreMesh.

A remote that becomes unreachable keeps its last state here (and in the datapath): only
its ``ready`` flag changes (Cilium's behaviour; ``cacheTTL`` is the kvstoremesh's
``--cache-expiry``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from villi.clustermesh import keys
from villi.clustermesh.ids import ClusterInfo
from villi.clustermesh.validate import check_config, check_identity, check_ipcache, check_node
from villi.identity.labels import LabelSet
from villi.kvstore import EventType, Store, WatchEvent, open_store
from villi.kvstore.backoff import Backoff, BackoffPolicy
from villi.kvstore.sync import PrefixSync

log = logging.getLogger(__name__)

#: Reconnects to a remote kvstore in direct mode (full jitter).
DIRECT_BACKOFF = BackoffPolicy(base=0.2, cap=30.0, max_attempts=None)


class MeshSink(Protocol):
    """What the remote state changes in the agent."""

    def upsert_identity(self, identity: int, labels: LabelSet) -> None: ...
    def delete_identity(self, identity: int) -> None: ...
    def set_pod(self, cluster: str, ip: str, entry: dict[str, Any] | None) -> None: ...
    async def set_node(self, cluster: str, name: str, entry: dict[str, Any] | None
                       ) -> None: ...
    def set_service(self, cluster: str, namespace: str, name: str, raw: bytes | None
                    ) -> None: ...


@dataclass
class Remote:
    """One remote cluster as this agent knows it."""

    name: str
    info: ClusterInfo | None = None
    identities: set[int] = field(default_factory=set)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: set[tuple[str, str]] = field(default_factory=set)
    synced: set[str] = field(default_factory=set)
    connected: bool = False
    error: str | None = None
    rejected: int = 0
    pending: dict[tuple[str, str], bytes | None] = field(default_factory=dict)
    since: float = field(default_factory=time.time)

    @property
    def synced_all(self) -> bool:
        """Every kind's initial listing is in (cached state counts)."""
        return self.info is not None and self.synced >= {k.name for k in keys.KINDS}

    @property
    def ready(self) -> bool:
        """Synced and reachable right now (``villi status`` shows the rest)."""
        return self.synced_all and self.connected

    def view(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.info.id if self.info else None,
                "ready": self.ready, "connected": self.connected,
                "synced": sorted(self.synced), "error": self.error,
                "identities": len(self.identities), "pods": len(self.pods),
                "nodes": len(self.nodes), "services": len(self.services),
                "rejected": self.rejected}


class RemoteClusters:
    """Validated state of every remote cluster, applied to a :class:`MeshSink`."""

    def __init__(self, local: ClusterInfo, sink: MeshSink) -> None:
        self.local = local
        self.sink = sink
        self.remotes: dict[str, Remote] = {}
        self.changed = asyncio.Event()

    def remote(self, name: str) -> Remote:
        r = self.remotes.get(name)
        if r is None:
            r = self.remotes[name] = Remote(name)
        return r

    # --- input -----------------------------------------------------------------------------
    async def set_config(self, name: str, raw: bytes | None) -> None:
        if name == self.local.name:
            return
        r = self.remote(name)
        if raw is None:
            return   # a removed config: keep the state (cached, fail-static)
        info, why = check_config(name, raw, local=self.local)
        if info is None:
            self._reject(r, keys.cluster_config_key(name), why)
            return
        r.info = info
        pending, r.pending = r.pending, {}
        for (kind, rest), value in pending.items():
            await self.apply(name, keys.KIND_BY_NAME[kind], rest, value)
        self._notify()

    async def apply(self, name: str, kind: keys.Kind, rest: str, value: bytes | None) -> None:
        """One key of remote ``name`` (``rest`` = the key below the kind's prefix)."""
        if name == self.local.name:
            log.warning("ignoring cached state that claims to be this cluster's (%s)", name)
            return
        r = self.remote(name)
        if r.info is None:   # its config has not arrived: validate once it does
            r.pending[(kind.name, rest)] = value
            return
        info = r.info
        if kind is keys.IDENTITIES:
            await self._identity(r, info, rest, value)
        elif kind is keys.IPCACHE:
            self._pod(r, info, rest, value)
        elif kind is keys.NODES:
            await self._node(r, info, rest, value)
        elif kind is keys.SERVICES:
            self._service(r, rest, value)

    def set_synced(self, name: str, kind: str, synced: bool) -> None:
        r = self.remote(name)
        (r.synced.add if synced else r.synced.discard)(kind)
        self._notify()

    def set_connected(self, name: str, connected: bool, error: str | None = None) -> None:
        r = self.remote(name)
        if r.connected != connected:
            r.since = time.time()
        r.connected, r.error = connected, error
        self._notify()

    # --- per kind --------------------------------------------------------------------------
    async def _identity(self, r: Remote, info: ClusterInfo, rest: str, value: bytes | None
                        ) -> None:
        try:
            identity = int(rest)
        except ValueError:
            self._reject(r, rest, "identity key is not a number")
            return
        if value is None:
            if identity in r.identities:
                r.identities.discard(identity)
                self.sink.delete_identity(identity)
            return
        labels, why = check_identity(info, identity, value)
        if labels is None:
            self._reject(r, f"identity {rest}", why)
            return
        r.identities.add(identity)
        self.sink.upsert_identity(identity, labels)

    def _pod(self, r: Remote, info: ClusterInfo, ip: str, value: bytes | None) -> None:
        if value is None:
            if r.pods.pop(ip, None) is not None:
                self.sink.set_pod(r.name, ip, None)
            return
        entry, why = check_ipcache(info, ip, value)
        if entry is None:
            self._reject(r, f"ipcache {ip}", why)
            if r.pods.pop(ip, None) is not None:
                self.sink.set_pod(r.name, ip, None)
            return
        entry["cluster"] = r.name
        r.pods[ip] = entry
        self.sink.set_pod(r.name, ip, entry)

    async def _node(self, r: Remote, info: ClusterInfo, name: str, value: bytes | None
                    ) -> None:
        if value is None:
            if r.nodes.pop(name, None) is not None:
                await self.sink.set_node(r.name, name, None)
            return
        entry, why = check_node(info, name, value)
        if entry is None:
            self._reject(r, f"node {name}", why)
            return
        r.nodes[name] = entry
        await self.sink.set_node(r.name, name, entry)

    def _service(self, r: Remote, rest: str, value: bytes | None) -> None:
        ns, _, name = rest.partition("/")
        if not name or "/" in name:
            self._reject(r, f"service {rest}", "not <namespace>/<name>")
            return
        if value is None:
            r.services.discard((ns, name))
        else:
            r.services.add((ns, name))
        self.sink.set_service(r.name, ns, name, value)

    def _reject(self, r: Remote, what: str, why: str | None) -> None:
        r.rejected += 1
        log.warning("rejected %s from cluster %s: %s", what, r.name, why)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    # --- views -----------------------------------------------------------------------------
    def ready(self, names: list[str]) -> bool:
        return all(n in self.remotes and self.remotes[n].ready for n in names)

    def synced(self, names: list[str]) -> bool:
        return all(n in self.remotes and self.remotes[n].synced_all for n in names)

    async def wait_synced(self, names: list[str], timeout: float) -> bool:
        """Wait until every named remote's state is in; False after ``timeout``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.synced(names):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return False
        return True

    def view(self) -> list[dict[str, Any]]:
        return [r.view() for _, r in sorted(self.remotes.items())]


def _value(event: WatchEvent) -> bytes | None:
    return None if event.type is EventType.DELETE else event.value


class CachedSource:
    """KVStoreMesh mode: everything comes from the local kvstore's cache prefixes.

    Ordering: the canaries are listed first and the cache after them, so a canary seen
    in that first listing was written before the cache listing was taken, and the cache
    listing therefore holds that kind's whole initial state. A kind counts as synced
    only once the cache listing has been applied."""

    mode = "kvstoremesh"

    def __init__(self, store: Store, clusters: RemoteClusters) -> None:
        self.store = store
        self.clusters = clusters
        self.canary_sync = PrefixSync(store, keys.SYNCED)
        self.cache_sync = PrefixSync(store, keys.CACHE)
        self._early: dict[tuple[str, str], bool] = {}

    async def run(self) -> None:
        await asyncio.gather(self._configs(), self._canaries(), self._status(),
                             self._cache(), self._flush_early())

    async def _configs(self) -> None:
        async for event in PrefixSync(self.store, keys.CLUSTER_CONFIG):
            name = event.key[len(keys.CLUSTER_CONFIG):]
            if name != self.clusters.local.name:
                await self.clusters.set_config(name, _value(event))

    async def _status(self) -> None:
        """The kvstoremesh's view of each remote's reachability."""
        async for event in PrefixSync(self.store, keys.CLUSTER_STATUS):
            name = event.key[len(keys.CLUSTER_STATUS):]
            raw = _value(event)
            if raw is None:
                continue
            try:
                data = json.loads(raw)
                self.clusters.set_connected(name, bool(data["connected"]), data.get("error"))
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring malformed %s", event.key)

    async def _canaries(self) -> None:
        async for event in self.canary_sync:
            parsed = keys.parse_synced_key(event.key)
            if parsed is None:
                continue
            present = event.type is not EventType.DELETE
            if self.cache_sync.synced.is_set():
                self.clusters.set_synced(*parsed, present)
            else:
                self._early[parsed] = present

    async def _flush_early(self) -> None:
        await self.cache_sync.synced.wait()
        early, self._early = self._early, {}
        for (remote, kind), present in early.items():
            self.clusters.set_synced(remote, kind, present)

    async def _cache(self) -> None:
        await self.canary_sync.synced.wait()
        async for event in self.cache_sync:
            parsed = keys.parse_cache_key(event.key)
            if parsed is None:
                continue
            kind, remote, rest = parsed
            await self.clusters.apply(remote, kind, rest, _value(event))


class DirectSource:
    """Direct mode: this agent connects to every remote cluster's kvstore itself."""

    mode = "direct"

    def __init__(self, remotes: dict[str, str], clusters: RemoteClusters,
                 opener: Callable[[str], Store] = open_store) -> None:
        self.remotes = remotes
        self.clusters = clusters
        self.opener = opener

    async def run(self) -> None:
        await asyncio.gather(*(self._one(name, url) for name, url in self.remotes.items()))

    async def _one(self, name: str, url: str) -> None:
        store = self.opener(url)
        clusters = self.clusters
        try:
            await follow_remote(
                store, name, clusters.local,
                on_config=lambda raw: clusters.set_config(name, raw),
                on_event=lambda kind, rest, value: clusters.apply(name, kind, rest, value),
                on_synced=lambda kind: clusters.set_synced(name, kind, True),
                on_connected=lambda ok, why: clusters.set_connected(name, ok, why))
        finally:
            await store.close()


async def follow_remote(
    store: Store, name: str, local: ClusterInfo | None, *,
    on_config: Callable[[bytes], Awaitable[None]],
    on_event: Callable[[keys.Kind, str, bytes | None], Awaitable[None]],
    on_synced: Callable[[str], None],
    on_connected: Callable[[bool, str | None], None],
    probe_interval: float = 2.0,
    backoff: BackoffPolicy = DIRECT_BACKOFF,
) -> None:
    """Follow remote cluster ``name`` through ``store`` until cancelled.

    Reads its cluster config (retried with full jitter until it is there and fits),
    then list+watches each kind of its state with one :class:`PrefixSync` each: they
    survive outages of the remote (the etcd client and the resync loop back off with
    full jitter) and, after one, hand over only the difference, so deletions made
    while the remote was away are not missed. A probe every ``probe_interval`` reports
    reachability through ``on_connected``; nothing here ever gives up. Used by
    direct-mode agents and by ``villi kvstoremesh``."""
    retry = Backoff(backoff)
    key = keys.cluster_config_key(name)
    while True:
        try:
            kv = await store.get(key)
            if kv is None:
                raise ConnectionError(f"{key} is missing: is that cluster's kvstoremesh "
                                      f"running with --cluster-name {name}?")
            info, why = check_config(name, kv.value, local=local)
            if info is None:
                raise ConnectionError(why)
            break
        except Exception as exc:   # noqa: BLE001 - reported, retried with jitter
            on_connected(False, str(exc) or type(exc).__name__)
            await retry.failed()
    await on_config(kv.value)
    on_connected(True, None)

    async def one(kind: keys.Kind) -> None:
        sync = PrefixSync(store, kind.state_prefix)

        async def tell() -> None:
            await sync.synced.wait()
            on_synced(kind.name)

        teller = asyncio.get_running_loop().create_task(tell())
        try:
            async for event in sync:
                rest = event.key[len(kind.state_prefix):]
                if kind is keys.IDENTITIES and "/" in rest:
                    continue
                await on_event(kind, rest, _value(event))
        finally:
            teller.cancel()

    async def probe() -> None:
        while True:
            await asyncio.sleep(probe_interval)
            try:
                async with asyncio.timeout(probe_interval):
                    await store.revision()
                on_connected(True, None)
            except Exception as exc:   # noqa: BLE001 - any failure means unreachable
                on_connected(False, f"unreachable: {exc or 'no answer'}")

    async with asyncio.TaskGroup() as tg:
        for kind in keys.KINDS:
            tg.create_task(one(kind))
        tg.create_task(probe())
