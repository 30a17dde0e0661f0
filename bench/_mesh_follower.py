"""One simulated agent's ClusterMesh side, for bench/clustermesh.py (a process of its own).

Follows the remote clusters like an agent does — through the local kvstore's cache
(``kvstoremesh``) or by connecting to every remote kvstore (``direct``) — into a sink
that only counts (no kernel), so what is measured is the clustermesh work itself.
Prints one JSON line when every remote is synced (time, RSS, CPU), then waits for
stdin to close (so the parent can count its connections meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from typing import Any

from villi.clustermesh.ids import ClusterInfo, parse_remote
from villi.clustermesh.remote import CachedSource, DirectSource, RemoteClusters
from villi.identity.labels import LabelSet
from villi.kvstore import open_store


class CountingSink:
    def __init__(self) -> None:
        self.identities = self.pods = self.nodes = self.services = 0

    def upsert_identity(self, identity: int, labels: LabelSet) -> None:
        self.identities += 1

    def delete_identity(self, identity: int) -> None:
        self.identities -= 1

    def set_pod(self, cluster: str, ip: str, entry: dict[str, Any] | None) -> None:
        self.pods += 1 if entry is not None else -1

    async def set_node(self, cluster: str, name: str, entry: dict[str, Any] | None) -> None:
        self.nodes += 1 if entry is not None else -1

    def set_service(self, cluster: str, namespace: str, name: str, raw: bytes | None) -> None:
        self.services += 1 if raw is not None else -1


async def main(args: argparse.Namespace) -> None:
    remotes = dict(parse_remote(r) for r in args.remote)
    sink = CountingSink()
    clusters = RemoteClusters(ClusterInfo(args.name, args.id), sink)
    local = open_store(args.local)
    source: CachedSource | DirectSource
    if args.mode == "direct":
        source = DirectSource(remotes, clusters)
    else:
        source = CachedSource(local, clusters)
    t0 = time.monotonic()
    task = asyncio.create_task(source.run())
    ok = await clusters.wait_synced(list(remotes), args.timeout)
    sync_s = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"synced": ok, "sync_s": sync_s, "rss_mb": ru.ru_maxrss / 1024,
                      "cpu_s": ru.ru_utime + ru.ru_stime, "pods": sink.pods,
                      "nodes": sink.nodes, "identities": sink.identities}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await local.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["kvstoremesh", "direct"], required=True)
    ap.add_argument("--local", required=True)
    ap.add_argument("--name", default="local")
    ap.add_argument("--id", type=int, default=1)
    ap.add_argument("--remote", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=600.0)
    asyncio.run(main(ap.parse_args()))
