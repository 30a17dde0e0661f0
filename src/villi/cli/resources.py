"""``villi apply -f`` / ``villi delete -f``: validate every file first, then write.

A file with any bad document changes nothing: loading validates all documents of all
files before the first write.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from villi import resources
from villi._nsenter import in_netns
from villi.cli.context import resolve


def load(paths: list[str]) -> list:
    """Validate every document of every file (policies, namespaces, services)."""
    from villi.policy.loader import load_files
    from villi.policy.models import KINDS

    KINDS.update(resources.all_kinds())  # one loader, one error format for every kind
    return load_files(paths)


async def _write(url: str, items: list, delete: bool) -> list[str]:
    from villi.kvstore import open_store

    done = []
    async with open_store(url) as store:
        for res in items:
            key = resources.key_of(res)
            if delete:
                existed = await store.delete(key)
                if res.kind == "Service":
                    from villi.service.allocator import release_cluster_ip

                    await release_cluster_ip(store, res.namespace, res.metadata.name)
                done.append(f"{_describe(res)} {'deleted' if existed else 'not found'}")
            else:
                extra = ""
                if res.kind == "Service":
                    from villi.service.allocator import allocate_cluster_ip

                    ip = await allocate_cluster_ip(store, res.namespace, res.metadata.name,
                                                   res.spec.cluster_ip or None)
                    extra = f" (clusterIP {ip})"
                old = await store.get(key)
                raw = resources.encode(res)
                if old is not None and old.value == raw:
                    done.append(f"{_describe(res)} unchanged{extra}")
                    continue
                await store.put(key, raw)
                done.append(f"{_describe(res)} {'configured' if old else 'created'}{extra}")
    return done


def _describe(res: object) -> str:
    kind = getattr(res, "kind", "resource").lower()
    ns = getattr(res, "namespace", None)
    name = res.metadata.name  # type: ignore[attr-defined]
    return f"{kind}/{name}" + (f" (namespace {ns})" if ns else "")


def apply_command(args: argparse.Namespace, delete: bool) -> int:
    items = load(args.filename)
    if not delete:  # accepted fields that select nothing here: never silent
        for warning in getattr(items, "warnings", ()):
            print(f"warning: {warning}", file=sys.stderr)
    target = resolve(args.kvstore)
    with in_netns(target.kvstore_netns):
        lines = asyncio.run(_write(target.kvstore, items, delete))
    for line in lines:
        print(line)
    return 0
