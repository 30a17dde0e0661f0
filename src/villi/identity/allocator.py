"""Cluster-wide identity allocation through the kvstore, and its garbage collector.

Key layout (all values ASCII)::

    villi/state/identities/v1/id/<id>                   -> <canonical labels>
    villi/state/identities/v1/value/<canonical labels>  -> <id>
    villi/state/identities/v1/value/<canonical labels>/<node> -> <id>   (node reference)

Why this shape: the *value* key makes "same labels ⇒ same id" a single create-if-absent
race that exactly one node wins (the others read the winner's id); the *id* key makes
"one id ⇒ one label set" another create-if-absent, so two nodes never hand out the same
number; the per-node references let the operator's GC see which identities are still
used without asking every agent. A node holds one reference per label set while it has
at least one endpoint with it (counted locally), optionally under its lease so a dead
node's references expire.

GC safety: a node writes its reference *before* it re-reads the value key and then
"touches" the value key with a compare-and-swap. The collector deletes a value key only
with a compare-and-delete on the mod revision it saw in the same listing that showed no
references, so a reference added after that listing always makes either the touch or the
delete fail, and the loser retries. Canonical label strings end in ``;`` and label
values cannot contain ``/``, which is how value keys and reference keys are told apart.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass

from villi.errors import IdentityError
from villi.identity.ids import IdentityID
from villi.identity.labels import SOURCE_CIDR, SOURCE_RESERVED, LabelSet
from villi.identity.local import LocalIdentityAllocator
from villi.identity.reserved import (
    MAX_CLUSTER_IDENTITY,
    MIN_CLUSTER_IDENTITY,
    reserved_identity_for,
)
from villi.kvstore.schema import IDENTITIES
from villi.kvstore.store import LeaseID, Store

PREFIX = IDENTITIES
ID_PREFIX = PREFIX + "id/"
VALUE_PREFIX = PREFIX + "value/"


def id_key(identity: int) -> str:
    return f"{ID_PREFIX}{identity}"


def value_key(labels: LabelSet) -> str:
    return f"{VALUE_PREFIX}{labels.canonical}"


def ref_key(labels: LabelSet, node: str) -> str:
    return f"{VALUE_PREFIX}{labels.canonical}/{node}"


def _cidr_prefix(labels: LabelSet) -> str | None:
    """The prefix of a CIDR label set (``cidr:<prefix>`` + reserved labels only)."""
    if not labels.labels or not labels.sources <= {SOURCE_CIDR, SOURCE_RESERVED}:
        return None
    cidrs = [lbl.key for lbl in labels if lbl.source == SOURCE_CIDR]
    return cidrs[0] if len(cidrs) == 1 else None


@dataclass(slots=True)
class _Held:
    identity: IdentityID
    count: int


class IdentityAllocator:
    """Allocates identities for one node; call :meth:`allocate` once per endpoint.

    Reserved label sets map to their fixed numbers, CIDR label sets to node-local
    identities, everything else to a cluster identity in ``[min_id, max_id]``.
    """

    def __init__(
        self,
        store: Store,
        node: str,
        *,
        lease: LeaseID | None = None,
        min_id: int = MIN_CLUSTER_IDENTITY,
        max_id: int = MAX_CLUSTER_IDENTITY,
        local: LocalIdentityAllocator | None = None,
        max_attempts: int = 64,
    ) -> None:
        if not node or "/" in node:
            raise ValueError(f"invalid node name {node!r}")
        self.store = store
        self.node = node
        self.lease = lease
        self.min_id = min_id
        self.max_id = max_id
        self.local = local or LocalIdentityAllocator()
        self.max_attempts = max_attempts
        self._held: dict[LabelSet, _Held] = {}
        self._locks: defaultdict[LabelSet, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._used: set[int] | None = None
        self._pending: set[int] = set()

    # -- public API ---------------------------------------------------------------------

    async def allocate(self, labels: LabelSet) -> IdentityID:
        """The identity of ``labels``, taking one local reference on it."""
        reserved = reserved_identity_for(labels)
        if reserved is not None:
            return reserved
        prefix = _cidr_prefix(labels)
        if prefix is not None:
            return self.local.acquire(prefix)[0]
        if not labels.labels:
            raise IdentityError("cannot allocate an identity for an empty label set")
        async with self._locks[labels]:
            held = self._held.get(labels)
            if held is not None:
                held.count += 1
                return held.identity
            identity = await self._acquire(labels)
            self._held[labels] = _Held(identity, 1)
            return identity

    async def release(self, labels: LabelSet) -> bool:
        """Drop one local reference; True when the node reference was removed."""
        if reserved_identity_for(labels) is not None:
            return False
        prefix = _cidr_prefix(labels)
        if prefix is not None:
            return self.local.release(prefix)[1]
        async with self._locks[labels]:
            held = self._held.get(labels)
            if held is None:
                raise IdentityError(f"release of identity not held by this node: {labels}")
            held.count -= 1
            if held.count > 0:
                return False
            del self._held[labels]
            await self.store.delete(ref_key(labels, self.node))
            return True

    def lookup(self, labels: LabelSet) -> IdentityID | None:
        """The identity this node holds for ``labels`` (no store access)."""
        held = self._held.get(labels)
        return held.identity if held else reserved_identity_for(labels)

    def refcount(self, labels: LabelSet) -> int:
        held = self._held.get(labels)
        return held.count if held else 0

    # -- internals ----------------------------------------------------------------------

    async def _acquire(self, labels: LabelSet) -> IdentityID:
        vkey = value_key(labels)
        for _ in range(self.max_attempts):
            # Reference first: from here on the GC will not collect the identity.
            await self.store.put(ref_key(labels, self.node), b"", lease=self.lease)
            kv = await self.store.get(vkey)
            if kv is None:
                created = await self._create(labels)
                if created is None:
                    continue  # lost the race for the value key: read the winner's id
                await self.store.put(ref_key(labels, self.node), str(created).encode(),
                                     lease=self.lease)
                return created
            identity = self._parse_id(kv.value, vkey)
            # Touch the value key so a GC that listed no references fails its delete.
            if await self.store.compare_and_swap(vkey, kv.mod_revision, kv.value):
                await self._ensure_id_key(identity, labels)
                await self.store.put(ref_key(labels, self.node), kv.value, lease=self.lease)
                return identity
        raise IdentityError(f"could not allocate an identity for {labels} after "
                            f"{self.max_attempts} attempts (kvstore contention)")

    async def _create(self, labels: LabelSet) -> IdentityID | None:
        """Claim a free id and then the value key; None when another node won."""
        canonical = labels.canonical.encode()
        for _ in range(self.max_attempts):
            candidate = await self._next_candidate()
            self._pending.add(candidate)
            try:
                if not await self.store.create(id_key(candidate), canonical):
                    self._mark_used(candidate)
                    continue
                self._mark_used(candidate)
                if await self.store.create(value_key(labels), str(candidate).encode()):
                    await self._ensure_id_key(IdentityID(candidate), labels)
                    return IdentityID(candidate)
                kv = await self.store.get(id_key(candidate))
                if kv is not None and kv.value == canonical:
                    await self.store.compare_and_delete(id_key(candidate), kv.mod_revision)
                if self._used is not None:
                    self._used.discard(candidate)
                return None
            finally:
                self._pending.discard(candidate)
        raise IdentityError(f"no free identity found for {labels} after "
                            f"{self.max_attempts} attempts")

    async def _ensure_id_key(self, identity: IdentityID, labels: LabelSet) -> None:
        """Heal an id key a GC removed mid-allocation; refuse a conflicting one."""
        kv = await self.store.get(id_key(identity))
        if kv is None:
            await self.store.create(id_key(identity), labels.canonical.encode())
        elif kv.value != labels.canonical.encode():
            raise IdentityError(f"identity {identity} is registered for "
                                f"{kv.value.decode(errors='replace')!r}, not {labels}")

    async def _next_candidate(self) -> int:
        if self._used is None:
            await self._refresh_used()
        assert self._used is not None
        for candidate in range(self.min_id, self.max_id + 1):
            if candidate not in self._used and candidate not in self._pending:
                return candidate
        await self._refresh_used()
        for candidate in range(self.min_id, self.max_id + 1):
            if candidate not in self._used and candidate not in self._pending:
                return candidate
        raise IdentityError(f"identity space {self.min_id}..{self.max_id} is exhausted")

    async def _refresh_used(self) -> None:
        listing = await self.store.list(ID_PREFIX)
        used: set[int] = set()
        for kv in listing.items:
            try:
                used.add(int(kv.key[len(ID_PREFIX):]))
            except ValueError:
                continue
        self._used = used

    def _mark_used(self, identity: int) -> None:
        if self._used is not None:
            self._used.add(identity)

    @staticmethod
    def _parse_id(raw: bytes, key: str) -> IdentityID:
        try:
            return IdentityID(int(raw.decode()))
        except (UnicodeDecodeError, ValueError) as exc:
            raise IdentityError(f"corrupt identity value at {key}: {raw!r}") from exc


@dataclass(frozen=True, slots=True)
class GCResult:
    """What one collection pass deleted and what it will delete next time if unchanged."""

    deleted: tuple[IdentityID, ...]
    candidates: int


class IdentityGC:
    """The operator's identity garbage collector.

    An identity is collected when its value key has no node reference in
    ``min_idle_runs`` consecutive passes (with an unchanged mod revision); an id key
    whose value key is gone or points elsewhere (left by a crashed or losing allocator)
    is collected the same way. ``min_idle_runs=1`` collects immediately, which is safe
    for referenced identities (see the module docstring) but may remove an id key an
    allocator created a moment ago; allocators heal that, yet two runs are the default.
    """

    def __init__(self, store: Store, *, min_idle_runs: int = 2) -> None:
        if min_idle_runs < 1:
            raise ValueError("min_idle_runs must be >= 1")
        self.store = store
        self.min_idle_runs = min_idle_runs
        self._seen: dict[tuple[str, str, int], int] = {}

    async def run_once(self) -> GCResult:
        listing = await self.store.list(PREFIX)
        ids: dict[int, tuple[bytes, int]] = {}
        values: dict[str, tuple[bytes, int]] = {}
        refs: defaultdict[str, int] = defaultdict(int)
        for kv in listing.items:
            rest = kv.key[len(PREFIX):]
            if rest.startswith("id/"):
                try:
                    ids[int(rest[3:])] = (kv.value, kv.mod_revision)
                except ValueError:
                    continue
            elif rest.startswith("value/"):
                body = rest[len("value/"):]
                if body.endswith(";"):
                    values[body] = (kv.value, kv.mod_revision)
                else:
                    canonical, sep, _node = body.rpartition(";/")
                    if sep:
                        refs[canonical + ";"] += 1
        candidates: dict[tuple[str, str, int], int] = {}
        for canonical, (_raw, rev) in values.items():
            if refs[canonical] == 0:
                key = ("value", canonical, rev)
                candidates[key] = self._seen.get(key, 0) + 1
        for identity, (raw, rev) in ids.items():
            owner = values.get(raw.decode(errors="replace"))
            if owner is None or owner[0] != str(identity).encode():
                key = ("id", str(identity), rev)
                candidates[key] = self._seen.get(key, 0) + 1
        deleted: list[IdentityID] = []
        remaining: dict[tuple[str, str, int], int] = {}
        for key, runs in candidates.items():
            if runs < self.min_idle_runs:
                remaining[key] = runs
                continue
            kind, name, rev = key
            if kind == "value":
                raw = values[name][0]
                if not await self.store.compare_and_delete(VALUE_PREFIX + name, rev):
                    continue
                try:
                    identity = int(raw.decode())
                except ValueError:
                    continue
                id_entry = ids.get(identity)
                if id_entry is not None and id_entry[0].decode(errors="replace") == name:
                    await self.store.compare_and_delete(id_key(identity), id_entry[1])
                deleted.append(IdentityID(identity))
            elif await self.store.compare_and_delete(id_key(int(name)), rev):
                deleted.append(IdentityID(int(name)))
        self._seen = remaining
        return GCResult(tuple(sorted(set(deleted))), len(remaining))


async def collect_garbage(store: Store) -> tuple[IdentityID, ...]:
    """One immediate GC pass (``min_idle_runs=1``): delete unreferenced identities."""
    return (await IdentityGC(store, min_idle_runs=1).run_once()).deleted
