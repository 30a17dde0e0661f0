"""The operator: cluster-wide jobs that no single agent should own.

Today these are the pod CIDR allocator (cluster-pool IPAM, :mod:`villi.operator.cidr`)
and the identity garbage collector (:class:`villi.identity.allocator.IdentityGC`). Both
are safe to run in several operator processes at once: every write they make is a
conditional transaction on the revision they read, so a second operator wastes a
little work but never corrupts state. That is why there is no leader election yet.

``villi operator`` (the CLI) builds :class:`OperatorSettings` from its flags and calls
:func:`run_operator`; cancelling that coroutine (Ctrl-C) stops every job cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Network

from villi.errors import VilliError
from villi.identity.allocator import IdentityGC
from villi.kvstore.backoff import BackoffPolicy, SleepFn, UniformSource
from villi.kvstore.store import Store
from villi.kvstore.sync import RESYNC_BACKOFF
from villi.operator.cidr import ClusterCIDRAllocator
from villi.operator.subnets import (
    DEFAULT_CLUSTER_CIDR,
    DEFAULT_NODE_MASK,
    validate_cluster_cidr,
)

log = logging.getLogger(__name__)

#: One identity GC pass; returns whatever it likes (logged at debug level).
IdentityGCFn = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    """The operator's flags.

    ``cluster_cidr``/``node_mask``: ``--cluster-cidr`` (default 10.64.0.0/10) and
    ``--node-mask`` (24: 254 pods per node). ``grace_period_s``: how long a node entry
    must stay gone before its pod CIDR is reclaimed (``--node-grace-period``).
    ``identity_gc_interval_s``: mean time between identity GC passes, each drawn
    uniformly within ``± identity_gc_jitter`` of it so operators restarted together do
    not sweep in step (Cilium: 15 min). ``resync_interval_s``: a full reconcile even
    when no change was seen. ``backoff``: retry policy of watches and failed passes
    (full jitter). ``start_jitter_s``: wait uniformly up to this long before the first
    store request (``--start-jitter``), so operators restarted together do not list the
    whole store in step. Invalid values raise at construction, before anything runs.
    """

    cluster_cidr: str = DEFAULT_CLUSTER_CIDR
    node_mask: int = DEFAULT_NODE_MASK
    grace_period_s: float = 300.0
    identity_gc_interval_s: float = 900.0
    identity_gc_jitter: float = 0.2
    resync_interval_s: float = 300.0
    backoff: BackoffPolicy = RESYNC_BACKOFF
    start_jitter_s: float = 0.0

    def __post_init__(self) -> None:
        validate_cluster_cidr(self.cluster_cidr, self.node_mask)
        if self.grace_period_s < 0:
            raise ValueError(f"grace period must be >= 0 s, got {self.grace_period_s}")
        if self.identity_gc_interval_s <= 0:
            raise ValueError("identity GC interval must be > 0 s")
        if not 0 <= self.identity_gc_jitter < 1:
            raise ValueError("identity GC jitter must be in [0, 1)")
        if self.resync_interval_s <= 0:
            raise ValueError("resync interval must be > 0 s")
        if self.start_jitter_s < 0:
            raise ValueError(f"start jitter must be >= 0 s, got {self.start_jitter_s}")

    @property
    def cluster_network(self) -> IPv4Network:
        return validate_cluster_cidr(self.cluster_cidr, self.node_mask)


class Operator:
    """The operator's jobs over one store; :meth:`run` until cancelled.

    ``identity_gc`` replaces the default collector pass (tests, or a rate-limited one);
    the default keeps one :class:`IdentityGC` across passes, because it deletes an
    identity only after seeing it unused in two consecutive passes.
    """

    def __init__(
        self,
        store: Store,
        settings: OperatorSettings | None = None,
        *,
        identity_gc: IdentityGCFn | None = None,
        rng: UniformSource | None = None,
        sleep: SleepFn | None = None,
    ) -> None:
        self.store = store
        self.settings = settings or OperatorSettings()
        self.cidr = ClusterCIDRAllocator(
            store,
            cluster_cidr=self.settings.cluster_cidr,
            node_mask=self.settings.node_mask,
            grace_period_s=self.settings.grace_period_s,
        )
        self._gc: IdentityGCFn = identity_gc or IdentityGC(store).run_once
        self._rng: UniformSource = rng or random.Random()
        self._sleep: SleepFn = sleep or asyncio.sleep
        self.gc_passes = 0
        self.gc_failures = 0

    async def run(self) -> None:
        s = self.settings
        log.info("operator starting: cluster CIDR %s, /%d per node, grace %.0f s",
                 s.cluster_cidr, s.node_mask, s.grace_period_s)
        if s.start_jitter_s > 0:
            await self._sleep(self._rng.uniform(0.0, s.start_jitter_s))
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(
                    self.cidr.run(resync_interval_s=s.resync_interval_s, backoff=s.backoff,
                                  rng=self._rng),
                    name="villi-operator cidr")
                tasks.create_task(self._identity_gc_loop(), name="villi-operator identity-gc")
        finally:
            log.info("operator stopped")

    async def _identity_gc_loop(self) -> None:
        s = self.settings
        while True:
            low = s.identity_gc_interval_s * (1 - s.identity_gc_jitter)
            high = s.identity_gc_interval_s * (1 + s.identity_gc_jitter)
            await self._sleep(self._rng.uniform(low, high))
            try:
                result = await self._gc()
            except VilliError as exc:  # the store is down: the next pass tries again
                self.gc_failures += 1
                log.warning("identity GC failed: %s", exc)
                continue
            except Exception:  # a bug in one pass must not stop pod CIDR allocation
                self.gc_failures += 1
                log.exception("identity GC crashed")
                continue
            self.gc_passes += 1
            log.debug("identity GC pass: %s", result)
            try:
                released = await self._cluster_ip_gc()
            except VilliError as exc:
                log.warning("ClusterIP GC failed: %s", exc)
                continue
            if released:
                log.info("released ClusterIPs of services that no longer exist: %s",
                         ", ".join(released))

    async def _cluster_ip_gc(self) -> list[str]:
        """Claims whose Service resource is gone (deleted behind villi's back, or a
        crash between the claim and the resource write) give their address back."""
        from villi.kvstore.schema import resource_prefix
        from villi.resources import parse_resource_key
        from villi.service.allocator import collect_garbage

        listing = await self.store.list(resource_prefix("Service"))
        live = []
        for kv in listing.items:
            parsed = parse_resource_key(kv.key)
            if parsed is not None:
                live.append((parsed[1] or "default", parsed[2]))
        return await collect_garbage(self.store, live)


async def run_operator(
    store: Store,
    settings: OperatorSettings | None = None,
    *,
    identity_gc: IdentityGCFn | None = None,
) -> None:
    """Run the operator's jobs on ``store`` until cancelled (see :class:`Operator`)."""
    await Operator(store, settings, identity_gc=identity_gc).run()
