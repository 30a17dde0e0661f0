"""``villi agent`` and ``villi operator``: long-running daemons, stopped by SIGTERM/SIGINT."""

from __future__ import annotations

import argparse

from villi._runner import run_until_signal
from villi.errors import VilliError


def run_agent_command(args: argparse.Namespace) -> int:
    from villi.agent.config import from_args
    from villi.agent.daemon import run_agent

    config = from_args(args)
    return run_until_signal(lambda: run_agent(config))


def run_operator_command(args: argparse.Namespace) -> int:
    from villi.cli.context import resolve
    from villi.kvstore import open_store
    from villi.operator.main import OperatorSettings, run_operator

    target = resolve(args.kvstore)
    from villi.kvstore.backoff import BackoffPolicy
    from villi.kvstore.sync import RESYNC_BACKOFF

    try:
        settings = OperatorSettings(
            cluster_cidr=args.cluster_cidr, node_mask=args.node_cidr_mask,
            grace_period_s=args.reclaim_grace,
            identity_gc_interval_s=args.identity_gc_interval,
            resync_interval_s=args.resync_interval,
            start_jitter_s=args.start_jitter,
            backoff=BackoffPolicy(RESYNC_BACKOFF.base, max(args.retry_cap, RESYNC_BACKOFF.base),
                                  None))
    except ValueError as e:
        raise VilliError(f"villi operator: {e}") from e

    if args.ipam == "eni":
        from villi.operator.eni_flags import eni_settings_from_args, run_eni_operator

        eni = eni_settings_from_args(args)

    async def run() -> None:
        store = open_store(target.kvstore)
        try:
            if args.ipam == "eni":
                await run_eni_operator(store, settings, eni)
            else:
                await run_operator(store, settings)
        finally:
            await store.close()

    return run_until_signal(run)
