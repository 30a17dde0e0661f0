"""The ``Store`` interface every kvstore backend implements.

The agent, operator and CLI talk to the cluster state only through this interface, so
the same code runs on a real etcd (multi-node) and on the embedded store (one node,
unit tests). Semantics follow etcd v3: every write bumps one global revision; a key
remembers the revision that created it and the one that last modified it; a watch
starts from a revision and first replays what changed since then.

All methods are coroutines: the agent is an asyncio program and must never block its
loop on the network.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import NewType

LeaseID = NewType("LeaseID", int)


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One stored key with its value and etcd-style revisions."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: LeaseID | None = None


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change seen by a watch. For DELETE, ``value`` is empty."""

    type: EventType
    key: str
    value: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class ListResult:
    """A prefix listing and the store revision it was read at (to watch from rev+1)."""

    items: list[KeyValue]
    revision: int


@dataclass(frozen=True, slots=True)
class TxnOp:
    """One write of a :meth:`Store.commit`: put ``value``, or delete when it is None.

    A put with ``lease`` is attached to it (as :meth:`Store.put`); an unknown or expired
    lease fails the whole commit with :class:`~villi.errors.StoreError`."""

    key: str
    value: bytes | None
    lease: LeaseID | None = None


class Store(abc.ABC):
    """Key-value store with revisions, prefix watches, leases and transactions."""

    @abc.abstractmethod
    async def get(self, key: str) -> KeyValue | None:
        """The current value of ``key``, or None."""

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, lease: LeaseID | None = None) -> int:
        """Write ``key``; returns the new store revision.

        With ``lease``, the key is deleted when the lease expires or is revoked; a lease
        that is unknown or already expired raises :class:`~villi.errors.StoreError`.
        Without ``lease``, a previous lease attachment of the key is dropped (as etcd)."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete ``key``; True when it existed."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many were deleted."""

    @abc.abstractmethod
    async def list(self, prefix: str) -> ListResult:
        """Every key under ``prefix`` (sorted by key) and the revision of the read."""

    @abc.abstractmethod
    async def create(self, key: str, value: bytes, lease: LeaseID | None = None) -> bool:
        """Create ``key`` only if absent (atomic); True when this call created it."""

    @abc.abstractmethod
    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease: LeaseID | None = None
    ) -> bool:
        """Write ``key`` only if its mod revision still equals ``expected_mod_revision``
        (0 means "must not exist"); True when the write happened."""

    @abc.abstractmethod
    async def compare_and_delete(self, key: str, expected_mod_revision: int) -> bool:
        """Delete ``key`` only if its mod revision still equals the expected one."""

    @abc.abstractmethod
    async def grant_lease(self, ttl_seconds: int) -> LeaseID:
        """A new lease that expires ``ttl_seconds`` after its last keep-alive."""

    @abc.abstractmethod
    async def keep_alive(self, lease: LeaseID) -> bool:
        """Refresh a lease once; False when it has already expired."""

    @abc.abstractmethod
    async def revoke_lease(self, lease: LeaseID) -> None:
        """Revoke a lease now, deleting every key attached to it."""

    async def commit(self, ops: Sequence[TxnOp], expect: Mapping[str, int]) -> int | None:
        """All of ``ops`` in one transaction and one revision, or none of them.

        ``expect`` maps keys to the mod revision they must still have (0: absent); if
        any differs, nothing is written and the result is None. Otherwise the result
        is the store revision after the commit. A key may appear once in ``ops``
        (ValueError otherwise). Watchers see every change of one commit at the same
        revision, so nobody observes half of it. A backend that cannot take this many
        operations at once (etcd's ``--max-txn-ops``, ``--max-request-bytes``) raises
        :class:`~villi.errors.StoreError` and writes nothing."""
        raise NotImplementedError

    async def revision(self) -> int:
        """The store's current revision; ``watch(prefix, revision() + 1)`` sees every
        change made after this call."""
        raise NotImplementedError

    async def compact(self, revision: int) -> None:
        """Forget the change history before ``revision``; watches that start earlier
        then raise :class:`Compacted`. Compacting to an already compacted revision is a
        no-op; a revision in the future is a :class:`~villi.errors.StoreError`.
        Backends also compact on their own (the embedded store keeps a bounded log)."""
        raise NotImplementedError

    @abc.abstractmethod
    def watch(
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncGenerator[WatchEvent, None]:
        """Changes under ``prefix`` from ``start_revision`` (None or <= 0: from the
        revision current when iteration begins; pass ``list().revision + 1`` to be exact).

        The result is an async generator holding a connection or a poll registration:
        close it (``async with contextlib.aclosing(store.watch(...)) as events:``) to
        release that at once rather than at garbage collection.

        The iterator survives backend restarts: it reconnects with jittered backoff and
        resumes from the last revision it delivered, so no event is lost or duplicated.
        When the start revision has been compacted away it raises
        :class:`~villi.kvstore.store.Compacted`; callers then list-then-watch again
        (``watch_prefix`` in ``villi.kvstore.sync`` does this for them).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and background tasks."""

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def check_unique(ops: Sequence[TxnOp]) -> None:
    """A commit names every key at most once (etcd refuses duplicates too)."""
    seen: set[str] = set()
    for op in ops:
        if op.key in seen:
            raise ValueError(f"key {op.key!r} appears twice in one commit")
        seen.add(op.key)


class Compacted(Exception):
    """A watch asked for a revision older than the store keeps; list again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision
