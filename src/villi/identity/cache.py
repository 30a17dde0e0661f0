"""The identity cache: every known identity's labels, and the reverse.

The policy engine needs labels for every identity in the cluster (a selector can only
select what it can see), while the allocator only knows the identities its own
endpoints use. The cache is fed from the kvstore's ``id/`` keys (list, then watch from
the listing's revision) and can be fed directly in tests; listeners hear about every
change so the selector cache can update incrementally instead of re-matching all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping

from villi.identity.allocator import ID_PREFIX
from villi.identity.ids import IdentityID
from villi.identity.labels import LabelSet
from villi.identity.reserved import reserved_identities
from villi.kvstore.store import Compacted, EventType, Store, WatchEvent

log = logging.getLogger(__name__)

#: ``listener(added_or_changed, removed)``; both map identity → labels.
IdentityListener = Callable[[Mapping[IdentityID, LabelSet], Mapping[IdentityID, LabelSet]], None]


class IdentityCache:
    """id → LabelSet and LabelSet → id, with change listeners."""

    def __init__(self, *, include_reserved: bool = True) -> None:
        self._by_id: dict[IdentityID, LabelSet] = {}
        self._by_labels: dict[LabelSet, IdentityID] = {}
        self._listeners: list[IdentityListener] = []
        #: Identities a resync of this cluster's store may drop (not remote clusters').
        self.owned: Callable[[int], bool] = lambda identity: identity >= 256
        if include_reserved:
            for identity, labels in reserved_identities().items():
                self._by_id[identity] = labels
                self._by_labels[labels] = identity

    def add_listener(self, listener: IdentityListener, *, replay: bool = True) -> None:
        """Subscribe; with ``replay`` the listener first hears every known identity."""
        self._listeners.append(listener)
        if replay and self._by_id:
            listener(dict(self._by_id), {})

    def remove_listener(self, listener: IdentityListener) -> None:
        self._listeners.remove(listener)

    def get(self, identity: int) -> LabelSet | None:
        return self._by_id.get(IdentityID(identity))

    def lookup(self, labels: LabelSet) -> IdentityID | None:
        return self._by_labels.get(labels)

    def __contains__(self, identity: object) -> bool:
        return identity in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[IdentityID]:
        return iter(self._by_id)

    def items(self) -> list[tuple[IdentityID, LabelSet]]:
        return list(self._by_id.items())

    def upsert(self, identity: int, labels: LabelSet) -> None:
        self.update({IdentityID(identity): labels}, ())

    def delete(self, identity: int) -> None:
        self.update({}, (IdentityID(identity),))

    def update(self, upserts: Mapping[IdentityID, LabelSet],
               deletes: tuple[IdentityID, ...] | list[IdentityID] | set[IdentityID]) -> None:
        """Apply a batch; listeners are told only about real changes."""
        added: dict[IdentityID, LabelSet] = {}
        removed: dict[IdentityID, LabelSet] = {}
        for identity in deletes:
            old = self._by_id.pop(identity, None)
            if old is not None:
                if self._by_labels.get(old) == identity:
                    del self._by_labels[old]
                removed[identity] = old
        for identity, labels in upserts.items():
            old = self._by_id.get(identity)
            if old == labels:
                removed.pop(identity, None)
                continue
            if old is not None:
                if self._by_labels.get(old) == identity:
                    del self._by_labels[old]
                removed[identity] = old
            self._by_id[identity] = labels
            self._by_labels[labels] = identity
            added[identity] = labels
        for identity in added:
            removed.pop(identity, None)
        if added or removed:
            for listener in list(self._listeners):
                listener(added, removed)

    # -- kvstore feed -------------------------------------------------------------------

    def apply_event(self, event: WatchEvent) -> None:
        """Apply one watch event on an ``id/<n>`` key."""
        identity = _id_from_key(event.key)
        if identity is None:
            return
        if event.type is EventType.DELETE:
            self.delete(identity)
            return
        try:
            labels = LabelSet.parse(event.value.decode())
        except (UnicodeDecodeError, ValueError):
            log.warning("ignoring corrupt identity %s: %r", event.key, event.value)
            return
        self.upsert(identity, labels)

    async def resync(self, store: Store) -> int:
        """Replace the cluster identities with the store's; returns the listing revision."""
        listing = await store.list(ID_PREFIX)
        seen: dict[IdentityID, LabelSet] = {}
        for kv in listing.items:
            identity = _id_from_key(kv.key)
            if identity is None:
                continue
            try:
                seen[identity] = LabelSet.parse(kv.value.decode())
            except (UnicodeDecodeError, ValueError):
                log.warning("ignoring corrupt identity %s: %r", kv.key, kv.value)
        gone = [i for i in self._by_id if self.owned(i) and i not in seen]
        self.update(seen, gone)
        return listing.revision

    async def run(self, store: Store, ready: asyncio.Event | None = None) -> None:
        """List then watch ``id/`` keys forever (cancel to stop); relist on compaction."""
        while True:
            revision = await self.resync(store)
            if ready is not None:
                ready.set()
            try:
                async for event in store.watch(ID_PREFIX, start_revision=revision + 1):
                    self.apply_event(event)
            except Compacted:
                log.info("identity watch compacted; listing again")
                continue


def _id_from_key(key: str) -> IdentityID | None:
    if not key.startswith(ID_PREFIX):
        return None
    try:
        return IdentityID(int(key[len(ID_PREFIX):]))
    except ValueError:
        return None
