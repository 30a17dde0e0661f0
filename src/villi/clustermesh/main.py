"""``villi kvstoremesh``: the command line of :mod:`villi.clustermesh.kvstoremesh`."""

from __future__ import annotations

import argparse

from villi._runner import run_until_signal
from villi.errors import VilliError


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cluster-name", required=True,
                    help="this cluster's name (io.cilium.k8s.policy.cluster of its pods)")
    ap.add_argument("--cluster-id", type=int, required=True,
                    help="this cluster's id, 1..255 (1..511 with --max-connected-clusters 511)")
    ap.add_argument("--max-connected-clusters", type=int, choices=[255, 511], default=255)
    ap.add_argument("--remote", action="append", default=[], metavar="NAME=URL[,URL...]",
                    help="a remote cluster and its kvstore endpoints; repeat for each (the "
                    "--kvstore-ca/-cert/-key flags apply to them too)")
    ap.add_argument("--lease-ttl", type=int, default=900,
                    help="TTL (s) of the lease the cache lives under (900)")
    ap.add_argument("--cache-expiry", type=float, default=0.0, metavar="SECONDS",
                    help="withdraw a remote's cached state after it has been unreachable "
                    "this long (0 = never, the default: fail-static)")


def run(args: argparse.Namespace, local_kvstore: str) -> int:
    from villi.clustermesh.ids import ClusterInfo, ClusterMeshError, parse_remote
    from villi.clustermesh.kvstoremesh import run_kvstoremesh

    try:
        local = ClusterInfo(args.cluster_name, args.cluster_id, args.max_connected_clusters)
        if local.id == 0:
            raise ClusterMeshError("--cluster-id must be at least 1 in a mesh")
        remotes = dict(parse_remote(spec) for spec in args.remote)
    except ClusterMeshError as e:
        raise VilliError(f"villi kvstoremesh: {e}") from e
    if len(remotes) != len(args.remote):
        raise VilliError("villi kvstoremesh: a remote cluster is named twice")

    try:
        run_until_signal(lambda: run_kvstoremesh(
            local_kvstore, local, remotes, lease_ttl=args.lease_ttl,
            cache_expiry=args.cache_expiry or None))
    except ValueError as e:
        raise VilliError(f"villi kvstoremesh: {e}") from e
    return 0
