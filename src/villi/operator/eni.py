"""The operator's ENI IPAM: keeps each node's pool of cloud IPs at Cilium's watermarks.

Per node (a node entry in the kvstore whose instance carries the tag
``villi-node=<node>``) it computes, from the cache (:mod:`villi.operator.eni_cache`)
and the agent's report (``eni-status/<node>``), ``needed`` and ``excess`` with Cilium's
formulas (:mod:`villi.ipam.eni`), then:

* allocation queue: nodes with a deficit are served largest deficit first, each at most
  one cloud operation per ``op_interval_s`` (1 s): assign IPs to an interface with room,
  else create an interface in the instance's subnet (or the largest one) and attach it
  at the next free device index (``first_interface_index`` up: interfaces below it,
  the instance's primary one, are never used for pods);
* excess: when a node has held more IPs than needed for ``release_delay_s`` (180 s,
  ``--excess-ip-release-delay``), unused IPs are marked for release; once the agent
  answered ``ready-for-release`` they are unassigned from their interface;
* publishes the node's :class:`~villi.ipam.eni.ENIRecord` (pool, interfaces, release
  marks, ``attachable``) after every change;
* garbage collection: interfaces tagged with this cluster that are detached (their
  instance was terminated) or belong to a node whose entry has been gone for
  ``node_grace_s`` are detached and deleted, and the node's record is removed.

The cloud client (:mod:`villi.operator.cloud`) rate-limits and backs off on throttling,
so one node's failure to get IPs never stalls the others: errors are recorded in that
node's record and retried on the next cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from villi.errors import CloudAPIError, IPAMError, StoreError
from villi.ipam.eni import (
    DO_NOT_RELEASE,
    ENI_STATUS_PREFIX,
    MARKED,
    READY_FOR_RELEASE,
    ENIAgentStatus,
    ENIInterface,
    ENIRecord,
    PoolParams,
    allocation_size,
    eni_key,
    excess_ips,
    needed_ips,
    surge,
)
from villi.ipam.keys import NODES_PREFIX, node_of_key
from villi.kvstore.store import EventType, Store
from villi.kvstore.sync import watch_prefix
from villi.operator.eni_cache import CachedInstance, CachedInterface, InterfaceCache

log = logging.getLogger(__name__)

NODE_TAG = "villi-node"
CLUSTER_TAG = "villi.io/cluster"


@dataclass(frozen=True, slots=True)
class ENISettings:
    """``--eni-*`` flags of ``villi operator --ipam eni``."""

    cloud_url: str = ""
    cluster_name: str = "default"
    pool: PoolParams = field(default_factory=PoolParams)
    resync: str = "incremental"
    resync_interval_s: float = 60.0
    op_interval_s: float = 1.0
    release_delay_s: float = 180.0
    release_excess: bool = True
    first_interface_index: int = 1
    node_grace_s: float = 30.0
    gc_interval_s: float = 10.0
    rate_limit: float = 20.0
    burst: float = 10.0

    def __post_init__(self) -> None:
        for name in ("resync_interval_s", "op_interval_s", "release_delay_s", "node_grace_s",
                     "gc_interval_s", "rate_limit", "burst"):
            if getattr(self, name) < 0:
                raise ValueError(f"ENI setting {name} must be >= 0")
        if self.first_interface_index < 0:
            raise ValueError("first interface index must be >= 0")


@dataclass(slots=True)
class _Node:
    name: str
    last_op: float = float("-inf")
    excess_since: float | None = None
    release: dict[str, str] = field(default_factory=dict)
    status: ENIAgentStatus = field(default_factory=ENIAgentStatus)
    published: bytes = b""
    error: str = ""
    gone_since: float | None = None


class ENIAllocator:
    """See the module docstring; :meth:`run` until cancelled, or drive :meth:`cycle`."""

    def __init__(self, store: Store, cache: InterfaceCache, settings: ENISettings, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.cache = cache
        self.s = settings
        self.clock = clock
        self.nodes: dict[str, _Node] = {}
        self.wake = asyncio.Event()
        self.last_full = float("-inf")
        self.last_gc = float("-inf")
        self.ops = 0
        self.op_log: list[tuple[str, str]] = []  # (node, what) per cloud mutation batch
        self.requested_per_op: list[tuple[int, int]] = []  # (requested, needed+watermark)
        self._seen_detached: set[str] = set()

    # -- kvstore side -----------------------------------------------------------------

    def node_seen(self, node: str) -> None:
        state = self.nodes.setdefault(node, _Node(node))
        state.gone_since = None
        self.wake.set()

    def node_gone(self, node: str) -> None:
        state = self.nodes.get(node)
        if state is not None and state.gone_since is None:
            state.gone_since = self.clock()
        self.wake.set()

    def status_seen(self, node: str, status: ENIAgentStatus) -> None:
        self.nodes.setdefault(node, _Node(node)).status = status
        self.wake.set()

    async def _follow_nodes(self) -> None:
        async for ev in watch_prefix(self.store, NODES_PREFIX):
            node = node_of_key(ev.key, NODES_PREFIX)
            if node is None:
                continue
            if ev.type is EventType.DELETE:
                self.node_gone(node)
            else:
                self.node_seen(node)

    async def _follow_status(self) -> None:
        async for ev in watch_prefix(self.store, ENI_STATUS_PREFIX):
            node = node_of_key(ev.key, ENI_STATUS_PREFIX)
            if node is None:
                continue
            if ev.type is EventType.DELETE:
                self.status_seen(node, ENIAgentStatus())
                continue
            try:
                self.status_seen(node, ENIAgentStatus.decode(ev.value, key=ev.key))
            except IPAMError as exc:
                log.warning("%s", exc)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow_nodes(), name="eni nodes")
            tasks.create_task(self._follow_status(), name="eni status")
            while True:
                try:
                    busy = await self.cycle()
                except (CloudAPIError, StoreError) as exc:
                    log.warning("ENI IPAM cycle failed: %s", exc)
                    busy = True
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(),
                                           self.s.op_interval_s if busy else
                                           min(self.s.resync_interval_s, self.s.gc_interval_s))

    # -- one pass ---------------------------------------------------------------------

    async def cycle(self) -> bool:
        """One pass over every node; True when work remains (a deficit waiting for its
        node's next operation slot, releases in flight)."""
        now = self.clock()
        if now - self.last_full >= self.s.resync_interval_s:
            await self.cache.full_resync()
            self.last_full = now
        busy = False
        live = [n for n in self.nodes.values() if n.gone_since is None]
        stats = {n.name: self._stats(n) for n in live}
        # the allocation queue: largest deficit first
        for node in sorted(live, key=lambda n: (-stats[n.name][2], n.name)):
            inst, available, needed = stats[node.name]
            if inst is None:
                node.error = f"no instance tagged {NODE_TAG}={node.name}"
                await self._publish(node, None)
                continue
            if needed > 0:
                if self.clock() - node.last_op < self.s.op_interval_s:
                    busy = True
                else:
                    try:
                        await self._allocate(node, inst, needed)
                        node.error = ""
                    except CloudAPIError as exc:
                        node.error = str(exc)
                        log.warning("node %s: allocation failed: %s", node.name, exc)
                    node.last_op = self.clock()
                    busy = True
            if self.s.release_excess and await self._handle_excess(node, inst):
                busy = True
            await self._publish(node, inst)
        if now - self.last_gc >= self.s.gc_interval_s:
            await self._gc()
            self.last_gc = now
        return busy

    def _stats(self, node: _Node) -> tuple[CachedInstance | None, int, int]:
        inst = self.cache.instance_of_node(node.name, NODE_TAG)
        if inst is None:
            return None, 0, 0
        available = len(self._pool(inst))
        return inst, available, needed_ips(self.s.pool, available, len(node.status.used))

    def _pool(self, inst: CachedInstance) -> list[IPv4Address]:
        return [ip for e in self._pod_interfaces(inst) for ip in e.ips]

    def _pod_interfaces(self, inst: CachedInstance) -> list[CachedInterface]:
        return [e for e in self.cache.interfaces_of(inst.id)
                if e.index is not None and e.index >= self.s.first_interface_index]

    async def _allocate(self, node: _Node, inst: CachedInstance, needed: int) -> None:
        max_ifaces, ips_per = self.cache.types.get(inst.type, (0, 0))
        room_per = ips_per - 1  # the interface's primary IP is not a pod IP
        pending = node.status.pending
        for eni in self._pod_interfaces(inst):
            room = room_per - len(eni.ips)
            cached = self.cache.subnets.get(eni.subnet)
            if room <= 0 or cached is None or cached.available <= 0:
                continue
            count = allocation_size(self.s.pool, needed, pending, room_on_interface=room,
                                    free_on_subnet=cached.available)
            self._record_request(count, needed, pending)
            await self.cache.assign(eni, count)
            self.ops += 1
            self.op_log.append((node.name, f"assign {count}"))
            log.info("node %s: assigned %d IPs to %s", node.name, count, eni.id)
            await self.cache.after_change(inst.id)
            return
        used_idx = {e.index for e in self.cache.interfaces_of(inst.id)}
        if len(used_idx) >= max_ifaces:
            raise CloudAPIError("allocate", "InstanceFull",
                                f"{inst.id} ({inst.type}) has all {max_ifaces} interfaces "
                                f"with {ips_per} IPs each")
        subnet = self._pick_subnet(inst)
        if subnet is None:
            raise CloudAPIError("allocate", "InsufficientFreeAddressesInSubnet",
                                "no subnet has a free address")
        count = allocation_size(self.s.pool, needed, pending, room_on_interface=room_per,
                                free_on_subnet=self.cache.subnets[subnet].available - 1)
        self._record_request(count, needed, pending)
        index = next(i for i in range(max(self.s.first_interface_index, 1), 64)
                     if i not in used_idx)
        eni = await self.cache.create_interface(
            subnet, count, f"villi-CNI ({inst.id})",
            {CLUSTER_TAG: self.s.cluster_name, NODE_TAG: node.name})
        try:
            await self.cache.attach(eni, inst.id, index)
        except CloudAPIError:
            await self.cache.delete(eni)  # nothing half-made
            raise
        self.ops += 2
        self.op_log.append((node.name, f"create+attach {count}"))
        log.info("node %s: attached %s (%d IPs) at index %d", node.name, eni.id, count, index)
        await self.cache.after_change(inst.id)

    def _record_request(self, count: int, needed: int, pending: int) -> None:
        """Keep (asked, needed + max-above-watermark + surge) per operation: the
        benchmark checks that no operation asks for more than that bound."""
        bound = needed + self.s.pool.max_above_watermark + surge(needed, pending)
        self.requested_per_op.append((count, bound))

    def _pick_subnet(self, inst: CachedInstance) -> str | None:
        own = self.cache.subnets.get(inst.subnet)
        if own is not None and own.available > 1:
            return own.id
        best = max(self.cache.subnets.values(), key=lambda s: (s.available, s.id), default=None)
        return best.id if best is not None and best.available > 1 else None

    async def _handle_excess(self, node: _Node, inst: CachedInstance) -> bool:
        """Mark, confirm and unassign excess IPs; True while a release is in flight."""
        pool = self._pool(inst)
        pool_set = {str(ip) for ip in pool}
        acks = node.status.release
        # answers to earlier marks
        for ip in list(node.release):
            if ip not in pool_set:
                del node.release[ip]  # released
            elif acks.get(ip) == DO_NOT_RELEASE or ip in node.status.used:
                del node.release[ip]
        ready = [ip for ip in node.release if acks.get(ip) == READY_FOR_RELEASE]
        if ready and self.clock() - node.last_op >= self.s.op_interval_s:
            by_eni: dict[str, list[IPv4Address]] = {}
            owner = {str(ip): e for e in self._pod_interfaces(inst) for ip in e.ips}
            for text in ready:
                by_eni.setdefault(owner[text].id, []).append(IPv4Address(text))
            eid, ips = next(iter(by_eni.items()))
            await self.cache.unassign(self.cache.interfaces[eid], ips)
            self.ops += 1
            self.op_log.append((node.name, f"unassign {len(ips)}"))
            node.last_op = self.clock()
            for addr in ips:
                node.release.pop(str(addr), None)
            log.info("node %s: released %d excess IPs from %s", node.name, len(ips), eid)
            await self.cache.after_change(inst.id)
            return True
        unmarked = len(pool) - len(node.release)
        excess = excess_ips(self.s.pool, unmarked, len(node.status.used))
        if excess <= 0:
            node.excess_since = None
            return bool(node.release)
        now = self.clock()
        if node.excess_since is None:
            node.excess_since = now
        if now - node.excess_since < self.s.release_delay_s:
            return True
        free = [str(ip) for ip in reversed(pool)
                if str(ip) not in node.status.used and str(ip) not in node.release]
        for ip in free[:excess]:
            node.release[ip] = MARKED
        node.excess_since = None
        return True

    async def _publish(self, node: _Node, inst: CachedInstance | None) -> None:
        if inst is None:
            rec = ENIRecord(node.name, "", "", 0, 0, error=node.error)
        else:
            max_ifaces, ips_per = self.cache.types.get(inst.type, (0, 0))
            ifaces = self._pod_interfaces(inst)
            attachable = sum(max(ips_per - 1 - len(e.ips), 0) for e in ifaces)
            attachable += max(max_ifaces - len(self.cache.interfaces_of(inst.id)), 0) * max(
                ips_per - 1, 0)
            free_in_subnets = sum(s.available for s in self.cache.subnets.values())
            attachable = min(attachable, free_in_subnets)
            available = sum(len(e.ips) for e in ifaces)
            if self.s.pool.max_allocate:
                attachable = min(attachable, max(self.s.pool.max_allocate - available, 0))
            used = len(node.status.used)
            rec = ENIRecord(
                node.name, inst.id, inst.type, max_ifaces, ips_per,
                tuple(ENIInterface(e.id, e.index or 0, e.subnet, e.primary_ip, tuple(e.ips),
                                   self._cidr(e.subnet))
                      for e in ifaces),
                dict(node.release), attachable, needed_ips(self.s.pool, available, used),
                excess_ips(self.s.pool, available, used), node.error)
        raw = rec.encode()
        if raw != node.published:
            await self.store.put(eni_key(node.name), raw)
            node.published = raw

    def _cidr(self, subnet: str) -> str:
        cached = self.cache.subnets.get(subnet)
        return cached.cidr if cached is not None else ""

    async def _gc(self) -> None:
        """Delete our interfaces left by terminated instances or departed nodes.

        Lists this cluster's interfaces by tag (one paginated Describe, like Cilium's
        GC of dangling ENIs) rather than trusting the cache: instances are terminated
        behind the operator's back, and the next full resync may be a minute away."""
        now = self.clock()
        detached: set[str] = set()
        listed = await self.cache.cloud.describe_all(
            "DescribeNetworkInterfaces", "NetworkInterfaces",
            TagFilter={CLUSTER_TAG: self.s.cluster_name})
        for doc in listed:
            fresh = CachedInterface.from_api(doc)
            cached = self.cache.interfaces.get(fresh.id)
            if cached is None:
                self.cache.interfaces[fresh.id] = fresh
            else:
                cached.instance_id, cached.index = fresh.instance_id, fresh.index
        for eni in [self.cache.interfaces[d["NetworkInterfaceId"]] for d in listed]:
            owner = self.nodes.get(eni.tags.get(NODE_TAG, ""))
            departed = (owner is not None and owner.gone_since is not None
                        and now - owner.gone_since >= self.s.node_grace_s)
            if eni.instance_id is None:
                if eni.id in self._seen_detached or departed:
                    log.info("GC: deleting detached interface %s", eni.id)
                    await self.cache.delete(eni)
                else:
                    detached.add(eni.id)  # seen once: delete on the next pass
            elif departed:
                log.info("GC: node %s is gone; removing %s", owner.name if owner else "?",
                         eni.id)
                await self.cache.detach(eni)
                await self.cache.delete(eni)
        self._seen_detached = detached
        for name, node in list(self.nodes.items()):
            if node.gone_since is not None and now - node.gone_since >= self.s.node_grace_s:
                await self.store.delete(eni_key(name))
                del self.nodes[name]
