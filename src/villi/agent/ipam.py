"""The agent's view of IPAM: the node pool plus its rate-limited usage report."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from villi.errors import IPAMError
from villi.ipam import NodePool, RateLimitedReporter
from villi.kvstore import Store

log = logging.getLogger(__name__)


class NodeIPAM:
    """Pod IPs of this node (persisted in the state dir) and usage reporting."""

    def __init__(self, state_dir: Path, node: str) -> None:
        self.pool = NodePool(node, state_dir=state_dir)
        self.reporter: RateLimitedReporter | None = None
        self._unheld: dict[str, str] = {}

    def reconcile(self, live: Mapping[str, str]) -> None:
        """Make sure every restored endpoint's IP is held (by its owner)."""
        for ip, owner in live.items():
            if self.pool.owner_of(ip) is None:
                try:
                    self.pool.allocate_specific(ip, owner)
                except IPAMError as e:  # no CIDR yet: set_cidrs() re-checks later
                    self._unheld[ip] = owner
                    log.warning("restored endpoint IP %s not held yet: %s", ip, e)

    def set_cidrs(self, cidrs: Iterable[str]) -> None:
        self.pool.set_cidrs(list(cidrs))
        pending, self._unheld = self._unheld, {}
        self.reconcile(pending)

    @property
    def cidrs(self) -> list[str]:
        return [str(c) for c in self.pool.cidrs]

    def allocate(self, owner: str) -> str:
        return str(self.pool.allocate(owner).ip)

    def release(self, ip: str) -> bool:
        return self.pool.release(ip) is not None

    def release_owner(self, owner: str) -> bool:
        return self.pool.release_owner(owner) is not None

    def cidr_of(self, ip: str) -> str | None:
        for cidr in (*self.pool.cidrs, *self.pool.draining):
            if _contains(cidr, ip):
                return str(cidr)
        return None

    def usage(self) -> dict[str, int]:
        return self.pool.usage().to_json()

    def start_reporting(self, store: Store, publish: Callable[[], Awaitable[Any]],
                        min_interval_s: float) -> None:
        self.reporter = RateLimitedReporter(publish=publish, min_interval_s=min_interval_s,
                                            name="node ipam usage")

    def notify(self) -> None:
        if self.reporter is not None:
            self.reporter.notify()

    async def close(self) -> None:
        if self.reporter is not None:
            await self.reporter.aclose()


def _contains(cidr: Any, ip: str) -> bool:
    from ipaddress import IPv4Address

    return IPv4Address(ip) in cidr
