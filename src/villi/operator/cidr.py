"""The cluster CIDR allocator: one pod CIDR per node, out of the cluster CIDR.

Keys (``villi.ipam.keys``): a node announces itself with ``nodes/v1/<node>`` (under its
lease); the operator claims a free subnet with a create-if-absent on
``ipam/v1/cidrs/<cidr>`` (value: the node) and then publishes it to the node with a
create-if-absent on ``ipam/v1/podcidrs/<node>``. Both writes are atomic and conditional,
so two operators running at once cannot give one CIDR to two nodes, nor two CIDRs to one
node: the loser of either race undoes its claim.

The allocator is level-triggered: :meth:`ClusterCIDRAllocator.reconcile` reads the whole
``ipam/v1/`` prefix in one listing (one revision, so claims and podcidrs are seen
consistently), compares it with the nodes that exist, and converges: heal podcidrs whose
claim is missing, drop stale claims, assign CIDRs to nodes that have none, and reclaim
the CIDRs of nodes gone for longer than the grace period. Every write is conditional on
the revision the listing showed, so a stale view makes a write fail (and the next pass
retry) instead of corrupting anything. :meth:`run` follows the nodes (list-then-watch)
and calls ``reconcile`` after every burst of changes.

Why a grace period: a node entry vanishes when its agent's lease expires, which is also
what an agent restart or a short kvstore partition look like. Reclaiming at once would
hand the CIDR, with pods still running in it, to the next node. A node that comes back
in time keeps its CIDR; one that comes back later asks for its old CIDR back through
the ``podCIDRs`` of its node entry and gets it when it is still free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from villi.errors import IPAMError, StoreError
from villi.ipam.capacity import IPAMUsage
from villi.ipam.keys import (
    CLAIMS_PREFIX,
    IPAM_PREFIX,
    NODES_PREFIX,
    PODCIDRS_PREFIX,
    USAGE_PREFIX,
    NodeEntry,
    cidr_of_claim_key,
    claim_key,
    decode_podcidrs,
    encode_podcidrs,
    node_key,
    node_of_key,
    podcidrs_key,
)
from villi.ipam.usage import decode_usage
from villi.kvstore.backoff import Backoff, BackoffPolicy, UniformSource
from villi.kvstore.store import EventType, Store
from villi.kvstore.sync import RESYNC_BACKOFF, PrefixSync
from villi.operator.nodes import DELETED_PREFIX, deleted_key, withdraw_node
from villi.operator.subnets import (
    DEFAULT_CLUSTER_CIDR,
    DEFAULT_NODE_MASK,
    RESERVED_RANGES,
    SubnetSpace,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class PassResult:
    """What one reconcile pass changed, and when the next reclaim deadline falls."""

    assigned: tuple[tuple[str, IPv4Network], ...] = ()
    reclaimed: tuple[tuple[str, IPv4Network], ...] = ()
    repaired: int = 0
    errors: tuple[str, ...] = ()
    next_deadline: float | None = None  # on the allocator's clock


@dataclass(slots=True)
class _Snapshot:
    """``ipam/v1/`` at one revision: node -> (cidrs, mod rev); cidr -> (node, mod rev)."""

    podcidrs: dict[str, tuple[tuple[IPv4Network, ...], int]]
    claims: dict[IPv4Network, tuple[str, int]]
    #: claims whose value is no valid node name (no node can ever own them).
    bad_claims: dict[IPv4Network, int] = field(default_factory=dict)
    #: nodes removed on purpose (tombstones, :mod:`villi.operator.nodes`) -> mod rev.
    deleted: dict[str, int] = field(default_factory=dict)


class ClusterCIDRAllocator:
    """Hands each node a ``/node_mask`` of ``cluster_cidr`` and reclaims it after the
    node has been gone for ``grace_period_s``.

    ``nodes`` is the set of nodes that exist (name -> parsed entry, None when the entry
    could not be parsed); :meth:`run` keeps it current from the store, tests may call
    :meth:`observe_node` and :meth:`reconcile` directly. ``clock`` (monotonic seconds)
    times the grace period.
    """

    def __init__(
        self,
        store: Store,
        *,
        cluster_cidr: str | IPv4Network = DEFAULT_CLUSTER_CIDR,
        node_mask: int = DEFAULT_NODE_MASK,
        grace_period_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if grace_period_s < 0:
            raise ValueError(f"grace period must be >= 0 s, got {grace_period_s}")
        self.store = store
        self.space = SubnetSpace.parse(cluster_cidr, node_mask)
        self.grace_period_s = grace_period_s
        self._clock = clock
        self.nodes: dict[str, NodeEntry | None] = {}
        self._absent_since: dict[str, float] = {}
        #: node -> its pod CIDRs, as of the last pass.
        self.assignments: dict[str, tuple[IPv4Network, ...]] = {}
        #: node -> its last IPAM usage report (``ipam/v1/usage/<node>``).
        self.usage: dict[str, IPAMUsage] = {}
        self.passes = 0

    # --- node view ------------------------------------------------------------------------------

    def observe_node(self, key: str, value: bytes | None) -> bool:
        """Apply one node entry change (``value`` None: the entry was deleted).

        Returns whether a pass is needed: a node appeared or went, or changed the pod
        CIDRs it asks for. Agents rewrite their entries every few seconds with new
        usage numbers; those need no pass."""
        name = node_of_key(key, NODES_PREFIX)
        if name is None:
            return False
        if value is None:
            return self.nodes.pop(name, False) is not False
        try:
            entry: NodeEntry | None = NodeEntry.decode(value, key=key)
        except IPAMError as exc:
            log.warning("node entry %s is unreadable (%s); assigning a pod CIDR anyway", key, exc)
            entry = None
        known = name in self.nodes
        before = self.nodes.get(name)
        self.nodes[name] = entry
        return not known or (before.pod_cidrs if before else ()) != (
            entry.pod_cidrs if entry else ())

    def observe_usage(self, key: str, value: bytes | None) -> bool:
        """Record a node's IPAM usage report (``ipam/v1/usage/<node>``); True when ``key``
        is one, which never needs a pass (the reports change with every pod start)."""
        name = node_of_key(key, USAGE_PREFIX)
        if name is None:
            return key.startswith(USAGE_PREFIX)
        if value is None:
            self.usage.pop(name, None)
            return True
        try:
            self.usage[name] = decode_usage(value, key=key)
        except IPAMError as exc:
            log.warning("%s", exc)
            self.usage.pop(name, None)
        return True

    # --- the pass ------------------------------------------------------------------------------

    async def reconcile(self) -> PassResult:
        """Converge the store once (see the module docstring); StoreError propagates."""
        nodes = dict(self.nodes)  # the watch may change self.nodes while we await
        snap = await self._snapshot()
        now = self._clock()
        repaired, errors = await self._heal_podcidrs(snap)
        repaired += await self._drop_stale_claims(snap)
        assigned = await self._assign(snap, nodes, errors)
        reclaimed = await self._reclaim_deleted(snap, nodes)
        more, deadline = await self._reclaim(snap, nodes, now)
        reclaimed += more
        self.assignments = {n: c for n, (c, _) in snap.podcidrs.items()}
        self.passes += 1
        return PassResult(tuple(assigned), tuple(reclaimed), repaired, tuple(errors), deadline)

    async def _snapshot(self) -> _Snapshot:
        listing = await self.store.list(IPAM_PREFIX)
        snap = _Snapshot({}, {})
        for kv in listing.items:
            node = node_of_key(kv.key, PODCIDRS_PREFIX)
            if node is not None:
                try:
                    snap.podcidrs[node] = (decode_podcidrs(kv.value), kv.mod_revision)
                except IPAMError as exc:
                    log.error("%s is corrupt (%s); assigning again", kv.key, exc)
                    snap.podcidrs[node] = ((), kv.mod_revision)
                continue
            gone = node_of_key(kv.key, DELETED_PREFIX)
            if gone is not None:
                snap.deleted[gone] = kv.mod_revision
                continue
            cidr = cidr_of_claim_key(kv.key)
            if cidr is not None:
                owner = kv.value.decode(errors="replace")
                if node_of_key(NODES_PREFIX + owner, NODES_PREFIX) == owner:
                    snap.claims[cidr] = (owner, kv.mod_revision)
                else:
                    snap.bad_claims[cidr] = kv.mod_revision
            elif kv.key.startswith(CLAIMS_PREFIX):
                log.warning("ignoring malformed CIDR claim %s", kv.key)
        return snap

    async def _heal_podcidrs(self, snap: _Snapshot) -> tuple[int, list[str]]:
        """Every CIDR in ``podcidrs/<n>`` must be claimed by ``n``: create missing claims;
        a CIDR claimed by another node is taken away from ``n`` (the claim is the
        authority) and ``n`` gets a new one."""
        repaired, errors = 0, []
        for node, (cidrs, rev) in sorted(snap.podcidrs.items()):
            keep: list[IPv4Network] = []
            for cidr in cidrs:
                owner = snap.claims.get(cidr, (None, 0))[0]
                if owner is None:  # a claim of another size may cover it
                    owner = next((o for c, (o, _) in snap.claims.items() if c.overlaps(cidr)),
                                 None)
                if owner is None and not any(cidr.overlaps(r) for r in RESERVED_RANGES):
                    if await self.store.create(claim_key(cidr), node.encode()):
                        log.info("re-created the missing claim of %s for node %s", cidr, node)
                        snap.claims[cidr] = (node, 0)
                        repaired += 1
                        owner = node
                    else:
                        kv = await self.store.get(claim_key(cidr))
                        owner = kv.value.decode(errors="replace") if kv else None
                if owner == node:
                    keep.append(cidr)
                else:
                    msg = (f"pod CIDR {cidr} of node {node} is claimed by "
                           f"{owner or 'a reserved range'}; assigning {node} another one")
                    log.error("%s", msg)
                    errors.append(msg)
            if len(keep) == len(cidrs) and cidrs:
                continue
            key = podcidrs_key(node)
            ok = (await self.store.compare_and_swap(key, rev, encode_podcidrs(keep)) if keep
                  else await self.store.compare_and_delete(key, rev))
            if ok:
                repaired += 1
                if keep:
                    snap.podcidrs[node] = (tuple(keep), 0)
                else:
                    del snap.podcidrs[node]
        return repaired, errors

    async def _drop_stale_claims(self, snap: _Snapshot) -> int:
        """Delete claims of nodes whose podcidrs exist but do not list them (left by an
        operator that lost the podcidrs race and crashed before undoing its claim), and
        claims naming no valid node (hand-written or corrupt)."""
        dropped = 0
        for cidr, rev in sorted(snap.bad_claims.items()):
            if await self.store.compare_and_delete(claim_key(cidr), rev):
                log.warning("dropped claim of %s by an invalid node name", cidr)
                dropped += 1
        for cidr, (node, rev) in sorted(snap.claims.items()):
            entry = snap.podcidrs.get(node)
            if entry is None or cidr in entry[0] or rev == 0:
                continue
            if await self.store.compare_and_delete(claim_key(cidr), rev):
                log.info("dropped stale claim of %s by node %s", cidr, node)
                del snap.claims[cidr]
                dropped += 1
        return dropped

    async def _assign(
        self, snap: _Snapshot, nodes: dict[str, NodeEntry | None], errors: list[str]
    ) -> list[tuple[str, IPv4Network]]:
        space = self.space
        claimed = space.reserved_indices()  # never hand out a reserved range
        for cidr in snap.claims:
            claimed.update(space.indices(cidr))
        cursor = 0
        assigned: list[tuple[str, IPv4Network]] = []
        for node, entry in sorted(nodes.items()):
            if node in snap.podcidrs:
                continue
            # Our own earlier claims first, then the node's wishes, then the lowest free.
            candidates = [c for c, (owner, _) in sorted(snap.claims.items()) if owner == node]
            hints = [c for c in (entry.pod_cidrs if entry else ()) if space.assignable(c)]
            got: IPv4Network | None = None
            for cidr in candidates:
                if await self._publish(node, cidr, snap):
                    got = cidr
                    break
            for cidr in hints if got is None else ():
                if not any(i in claimed for i in space.indices(cidr)):
                    claimed.update(space.indices(cidr))
                    if await self._claim_and_publish(node, cidr, snap):
                        got = cidr
                        break
            while got is None and node not in snap.podcidrs:
                while cursor < space.count and cursor in claimed:
                    cursor += 1
                if cursor >= space.count:
                    msg = (f"cluster CIDR {space.cluster} has no free /{space.node_mask} left "
                           f"for node {node}; widen --cluster-cidr or remove nodes")
                    log.error("%s", msg)
                    errors.append(msg)
                    return assigned
                cidr = space.subnet(cursor)
                claimed.add(cursor)
                if await self._claim_and_publish(node, cidr, snap):
                    got = cidr
            if got is not None:
                log.info("assigned pod CIDR %s to node %s", got, node)
                assigned.append((node, got))
        return assigned

    async def _claim_and_publish(self, node: str, cidr: IPv4Network, snap: _Snapshot) -> bool:
        """Claim ``cidr`` for ``node`` and publish it; False when someone else holds it
        or the node got another CIDR meanwhile (``snap`` then says which)."""
        if not await self.store.create(claim_key(cidr), node.encode()):
            kv = await self.store.get(claim_key(cidr))
            if kv is None or kv.value.decode(errors="replace") != node:
                return False  # another node's: keep searching
        return await self._publish(node, cidr, snap)

    async def _publish(self, node: str, cidr: IPv4Network, snap: _Snapshot) -> bool:
        """Write ``podcidrs/<node>`` = [cidr] if absent; undo our claim if we lost."""
        key = podcidrs_key(node)
        if await self.store.compare_and_swap(key, 0, encode_podcidrs([cidr])):
            snap.podcidrs[node] = ((cidr,), 0)
            snap.claims[cidr] = (node, 0)
            return True
        kv = await self.store.get(key)
        current: tuple[IPv4Network, ...] = ()
        if kv is not None:
            with contextlib.suppress(IPAMError):
                current = decode_podcidrs(kv.value)
            snap.podcidrs[node] = (current, kv.mod_revision)
        if cidr not in current:
            claim = await self.store.get(claim_key(cidr))
            if claim is not None and claim.value == node.encode():
                await self.store.compare_and_delete(claim_key(cidr), claim.mod_revision)
            snap.claims.pop(cidr, None)
            return False
        return True

    async def _reclaim_deleted(
        self, snap: _Snapshot, nodes: dict[str, NodeEntry | None]
    ) -> list[tuple[str, IPv4Network]]:
        """Nodes removed on purpose: withdraw their state and reclaim their pod CIDRs now,
        with no grace period (their pods are gone), then drop the tombstone."""
        reclaimed: list[tuple[str, IPv4Network]] = []
        for node, rev in sorted(snap.deleted.items()):
            kv = await self.store.get(node_key(node))
            if kv is not None:
                if kv.create_revision > rev:  # added again after its removal
                    await self.store.compare_and_delete(deleted_key(node), rev)
                continue  # its removal is under way: the watch brings us back
            nodes.pop(node, None)
            # the store says it is gone; a lagging watch must not make the next pass
            # assign it a CIDR again (a later PUT from the watch re-adds it)
            self.nodes.pop(node, None)
            await withdraw_node(self.store, node)
            freed = await self._free(node, snap)
            if freed is None:
                continue  # changed under us: the next pass looks again
            reclaimed += freed
            self._absent_since.pop(node, None)
            await self.store.compare_and_delete(deleted_key(node), rev)
            log.info("node %s was deleted: reclaimed %s at once", node,
                     ", ".join(str(c) for _, c in freed) or "nothing")
        return reclaimed

    async def _free(
        self, node: str, snap: _Snapshot
    ) -> list[tuple[str, IPv4Network]] | None:
        """Delete ``podcidrs/<node>`` and the node's claims (each on the revision the
        snapshot saw); None when the podcidrs key changed under us."""
        entry = snap.podcidrs.get(node)
        if entry is not None and not await self.store.compare_and_delete(
                podcidrs_key(node), entry[1]):
            return None
        snap.podcidrs.pop(node, None)
        freed: list[tuple[str, IPv4Network]] = []
        for cidr, (owner, rev) in sorted(snap.claims.items()):
            if owner == node and await self.store.compare_and_delete(claim_key(cidr), rev):
                del snap.claims[cidr]
                freed.append((node, cidr))
        return freed

    async def _reclaim(
        self, snap: _Snapshot, nodes: dict[str, NodeEntry | None], now: float
    ) -> tuple[list[tuple[str, IPv4Network]], float | None]:
        holders = set(snap.podcidrs) | {owner for owner, _ in snap.claims.values()}
        for node in list(self._absent_since):
            if node in nodes or node not in holders:
                del self._absent_since[node]
        reclaimed: list[tuple[str, IPv4Network]] = []
        deadline: float | None = None
        for node in sorted(holders - set(nodes)):
            since = self._absent_since.setdefault(node, now)
            due = since + self.grace_period_s
            if now < due:
                deadline = due if deadline is None else min(deadline, due)
                continue
            if await self.store.get(node_key(node)) is not None:
                continue  # back already; the watch will tell us
            freed = await self._free(node, snap)
            if freed is None:
                continue  # changed under us: the next pass looks again
            reclaimed += freed
            log.info("reclaimed %s from node %s (gone for %.0f s)",
                     ", ".join(str(c) for _, c in freed) or "nothing", node, now - since)
            del self._absent_since[node]
        return reclaimed, deadline

    # --- the loop --------------------------------------------------------------------------------

    async def run(
        self,
        *,
        resync_interval_s: float = 300.0,
        backoff: BackoffPolicy = RESYNC_BACKOFF,
        rng: UniformSource | None = None,
    ) -> None:
        """Follow nodes and ``ipam/v1/`` and reconcile after each burst of changes, at
        each reclaim deadline and every ``resync_interval_s``; runs until cancelled.
        A failing pass is retried with full-jitter backoff."""
        wake = asyncio.Event()
        nodes = PrefixSync(self.store, NODES_PREFIX, backoff=backoff, rng=rng)
        ipam = PrefixSync(self.store, IPAM_PREFIX, backoff=backoff, rng=rng)

        async def follow_nodes() -> None:
            async with aclosing(aiter(nodes)) as events:
                async for ev in events:
                    value = None if ev.type is EventType.DELETE else ev.value
                    if self.observe_node(ev.key, value):
                        wake.set()

        async def follow_ipam() -> None:
            async with aclosing(aiter(ipam)) as events:
                async for ev in events:
                    value = None if ev.type is EventType.DELETE else ev.value
                    if not self.observe_usage(ev.key, value):
                        wake.set()

        retry = Backoff(backoff, rng=rng)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(follow_nodes(), name="villi-operator nodes")
            tasks.create_task(follow_ipam(), name="villi-operator ipam")
            await nodes.synced.wait()
            await ipam.synced.wait()
            while True:
                wake.clear()
                try:
                    result = await self.reconcile()
                except StoreError as exc:
                    log.warning("pod CIDR reconcile failed: %s; retrying", exc)
                    if not await retry.failed():
                        raise
                    continue
                retry.reset()
                timeout = resync_interval_s
                if result.next_deadline is not None:
                    timeout = min(timeout, max(0.0, result.next_deadline - self._clock()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await wake.wait()
