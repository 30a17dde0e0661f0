"""The agent's side of cluster-pool mode: follow the pod CIDRs the operator assigns.

The agent watches its one ``villi/state/ipam/v1/podcidrs/<node>`` key (list-then-watch,
so it survives store restarts and compaction) and feeds every new list to
:meth:`villi.ipam.pool.NodePool.set_cidrs`. Until the first list arrives the pool has
nothing to hand out and ``allocate`` raises :class:`~villi.errors.PoolExhausted`
("no pod CIDR assigned yet"), which the CNI plugin reports as "try again later".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from ipaddress import IPv4Network

from villi.errors import IPAMError
from villi.ipam.keys import decode_podcidrs, podcidrs_key
from villi.kvstore.backoff import BackoffPolicy
from villi.kvstore.store import EventType, Store
from villi.kvstore.sync import RESYNC_BACKOFF, PrefixSync

log = logging.getLogger(__name__)


async def follow_pod_cidrs(
    store: Store, node: str, *, backoff: BackoffPolicy = RESYNC_BACKOFF
) -> AsyncGenerator[tuple[IPv4Network, ...], None]:
    """The node's pod CIDRs now (when assigned) and after every change; ``()`` when the
    operator reclaimed them. Repeats are suppressed. Runs until the consumer stops.

    A malformed value is logged and skipped (the operator repairs it)."""
    key = podcidrs_key(node)
    last: tuple[IPv4Network, ...] | None = None
    # The prefix "…/podcidrs/n1" also covers "…/podcidrs/n10": compare whole keys.
    async with aclosing(aiter(PrefixSync(store, key, backoff=backoff))) as events:
        async for event in events:
            if event.key != key:
                continue
            if event.type is EventType.DELETE:
                cidrs: tuple[IPv4Network, ...] = ()
            else:
                try:
                    cidrs = decode_podcidrs(event.value)
                except IPAMError as exc:
                    log.warning("%s: %s; waiting for the operator to fix it", key, exc)
                    continue
            if cidrs != last:
                last = cidrs
                yield cidrs


async def wait_pod_cidrs(
    store: Store, node: str, timeout: float | None = None
) -> tuple[IPv4Network, ...]:
    """The node's pod CIDRs once the operator assigned some; TimeoutError after
    ``timeout`` seconds saying that the operator may not be running."""
    try:
        async with asyncio.timeout(timeout):
            async with aclosing(follow_pod_cidrs(store, node)) as updates:
                async for cidrs in updates:
                    if cidrs:
                        return cidrs
    except TimeoutError:
        raise TimeoutError(f"no pod CIDR assigned to node {node} within {timeout} s: "
                           "is `villi operator` running?") from None
    raise IPAMError(f"stopped following the pod CIDRs of node {node}")
