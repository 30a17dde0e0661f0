"""The agent's IPAM in ``--ipam eni`` mode: same surface as :class:`~villi.agent.ipam.NodeIPAM`.

Follows the operator's ENI record for this node (``villi/state/ipam/v1/eni/<node>``),
hands pod IPs out of it (:class:`~villi.ipam.eni_pool.ENIPool`), and reports used IPs,
release answers and pending pods to ``eni-status/<node>`` under the agent's lease, at
most every ``--ipam-node-update-rate`` (the same rate limit as the node entry).

``cidrs`` are the pool's IPs as /32s: they go into the node entry's ``podCIDRs``, so
other nodes route exactly the IPs attached to this node toward it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from villi.agent.eni_links import ENILinks
from villi.errors import IPAMError
from villi.ipam import RateLimitedReporter
from villi.ipam.eni import ENIRecord, eni_key, eni_status_key
from villi.ipam.eni_pool import ENIPool
from villi.kvstore import Store
from villi.kvstore.store import EventType, LeaseID
from villi.kvstore.sync import watch_prefix

log = logging.getLogger(__name__)


class ENINodeIPAM:
    """Pod IPs from the node's ENI pool, plus the status report to the operator."""

    def __init__(self, state_dir: Path, node: str, links: ENILinks | None = None) -> None:
        self.node = node
        self.pool = ENIPool(node, state_dir=state_dir)
        self.links = links  # per-interface routing in the node namespace (agent only)
        self.reporter: RateLimitedReporter | None = None
        self.status_reporter: RateLimitedReporter | None = None
        self._store: Store | None = None
        self._lease: Callable[[], LeaseID | None] = lambda: None
        self.on_pool_change: Callable[[], Awaitable[Any]] | None = None

    def reconcile(self, live: Mapping[str, str]) -> None:
        for ip, owner in live.items():
            try:
                self.pool.hold(ip, owner)
            except IPAMError as exc:
                log.warning("restored endpoint IP %s: %s", ip, exc)

    def set_cidrs(self, cidrs: object) -> None:  # cluster-pool only
        raise IPAMError("--pod-cidr cannot be used with --ipam eni")

    @property
    def cidrs(self) -> list[str]:
        rec = self.pool.record
        return sorted(f"{ip}/32" for ip in rec.pool()) if rec is not None else []

    def allocate(self, owner: str) -> str:
        try:
            ip = str(self.pool.allocate(owner))
        finally:
            self.notify()  # a refusal is a pending pod: the operator should know soon
        self._sync_links()
        return ip

    def release(self, ip: str) -> bool:
        done = self.pool.release(ip)
        self._sync_links()
        return done

    def release_owner(self, owner: str) -> bool:
        done = self.pool.release_owner(owner)
        self._sync_links()
        return done

    def _sync_links(self) -> None:
        if self.links is not None:
            self.links.sync(self.pool.record, self.pool.owners())

    def cidr_of(self, ip: str) -> str | None:
        return self.pool.interface_of(ip)

    def usage(self) -> dict[str, int]:
        return self.pool.usage().to_json()

    def interfaces(self) -> list[dict[str, Any]]:
        rec = self.pool.record
        return [e.to_json() for e in rec.interfaces] if rec is not None else []

    def start_reporting(self, store: Store, publish: Callable[[], Awaitable[Any]],
                        min_interval_s: float, lease: Callable[[], LeaseID | None]
                        = lambda: None) -> None:
        self._store, self._lease = store, lease
        self.reporter = RateLimitedReporter(publish=publish, min_interval_s=min_interval_s,
                                            name="node ipam usage")
        self.status_reporter = RateLimitedReporter(
            publish=self._publish_status, min_interval_s=min_interval_s,
            name="eni status")

    async def follow(self) -> None:
        """Apply every change of this node's ENI record (run as an agent task)."""
        assert self._store is not None
        key = eni_key(self.node)
        async for ev in watch_prefix(self._store, key):
            if ev.key != key or ev.type is EventType.DELETE:
                continue
            try:
                record = ENIRecord.decode(ev.value, key=ev.key)
            except IPAMError as exc:
                log.warning("%s", exc)
                continue
            before = self.cidrs
            self.pool.set_record(record)
            self._sync_links()
            self.notify()
            if self.cidrs != before and self.on_pool_change is not None:
                await self.on_pool_change()

    async def _publish_status(self) -> None:
        assert self._store is not None
        await self._store.put(eni_status_key(self.node), self.pool.status().encode(),
                              lease=self._lease())

    def notify(self) -> None:
        for r in (self.reporter, self.status_reporter):
            if r is not None:
                r.notify()

    async def close(self) -> None:
        for r in (self.reporter, self.status_reporter):
            if r is not None:
                await r.aclose()
        if self.links is not None:
            self.links.close()
