"""``villi operator --ipam eni``: its flags and how it runs beside the other jobs.

In ENI mode the operator does not hand out pod CIDRs (pods take cloud IPs); it runs the
ENI allocator (:mod:`villi.operator.eni`) against the cloud API at ``--cloud-url``,
plus the identity and ClusterIP garbage collection every operator runs. Kept apart
from ``main.py`` so that cluster-pool operators never import aiohttp's client.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from villi.ipam.eni import PoolParams
from villi.kvstore.store import Store
from villi.operator.eni import ENISettings
from villi.operator.eni_cache import STRATEGIES

log = logging.getLogger(__name__)


def add_eni_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ipam", choices=["cluster-pool", "eni"], default="cluster-pool",
                   help="cluster-pool: pod CIDRs per node; eni: cloud interface IPs")
    p.add_argument("--cloud-url", help="cloud API base URL (eni; `villi cloud-sim` in the lab)")
    p.add_argument("--cluster-name", default="default",
                   help="tag on the interfaces this cluster creates (eni GC)")
    p.add_argument("--eni-resync", choices=STRATEGIES, default="incremental",
                   help="per-subnet | all | incremental (after each change only the "
                   "changed instance, plus a periodic full resync)")
    p.add_argument("--eni-resync-interval", type=float, default=60.0)
    p.add_argument("--pre-allocate", type=int, default=8)
    p.add_argument("--min-allocate", type=int, default=0)
    p.add_argument("--max-allocate", type=int, default=0)
    p.add_argument("--max-above-watermark", type=int, default=0)
    p.add_argument("--excess-ip-release-delay", type=float, default=180.0)
    p.add_argument("--no-release-excess-ips", dest="release_excess", action="store_false")
    p.add_argument("--first-interface-index", type=int, default=1)
    p.add_argument("--cloud-api-qps", type=float, default=20.0,
                   help="client-side rate limit of cloud API calls per second")
    p.add_argument("--cloud-api-burst", type=float, default=10.0)
    p.add_argument("--eni-gc-interval", type=float, default=10.0)


def eni_settings_from_args(args: argparse.Namespace) -> ENISettings:
    if not args.cloud_url:
        raise SystemExit("villi operator --ipam eni needs --cloud-url (the cloud API)")
    try:
        return ENISettings(
            cloud_url=args.cloud_url, cluster_name=args.cluster_name,
            pool=PoolParams(args.pre_allocate, args.min_allocate, args.max_allocate,
                            args.max_above_watermark),
            resync=args.eni_resync, resync_interval_s=args.eni_resync_interval,
            release_delay_s=args.excess_ip_release_delay,
            release_excess=args.release_excess,
            first_interface_index=args.first_interface_index,
            node_grace_s=args.reclaim_grace, gc_interval_s=args.eni_gc_interval,
            rate_limit=args.cloud_api_qps, burst=args.cloud_api_burst)
    except ValueError as exc:
        raise SystemExit(f"villi operator: {exc}") from None


async def run_eni_operator(store: Store, settings: object, eni: ENISettings) -> None:
    """The ENI allocator plus the identity/ClusterIP GC loop of :class:`Operator`."""
    from villi.operator.cloud import CloudClient
    from villi.operator.eni import ENIAllocator
    from villi.operator.eni_cache import InterfaceCache
    from villi.operator.main import Operator

    op = Operator(store, settings)  # type: ignore[arg-type]
    async with CloudClient(eni.cloud_url, rate=eni.rate_limit, burst=eni.burst) as cloud:
        alloc = ENIAllocator(store, InterfaceCache(cloud, strategy=eni.resync), eni)
        log.info("operator starting in ENI mode: cloud %s, resync %s, pre-allocate %d",
                 eni.cloud_url, eni.resync, eni.pool.pre_allocate)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(alloc.run(), name="villi-operator eni")
            tasks.create_task(op._identity_gc_loop(), name="villi-operator identity-gc")
