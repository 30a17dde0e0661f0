"""``villi apply -f`` / ``villi delete -f``: validate everything, then one transaction.

All or nothing, twice over:

1. Loading validates every document of every source (files, every ``*.yaml``, ``*.yml``
   and ``*.json`` of a directory in name order, ``-`` for stdin) before anything is
   written; one bad document, an alias bomb or an oversized document changes nothing.
2. Writing reads the current value of every key (bounded by ``PREFLIGHT_TIMEOUT``, so
   a frozen kvstore fails fast and provably before anything was sent), then commits
   every change in ONE kvstore transaction that also checks none of those keys
   changed meanwhile (:meth:`villi.kvstore.Store.commit`). Agents watching the store
   see the whole apply at one revision or nothing of it; an interrupt or an error
   before the commit leaves nothing applied. A transaction larger than etcd allows
   (``--max-txn-ops``, ``--max-request-bytes``) is refused by etcd as a whole.

The one write outside the transaction is a Service's ClusterIP claim (it must be
atomic per address across writers); a claim whose service was never committed is an
orphan that the operator's ClusterIP GC releases.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from villi import resources
from villi._nsenter import in_netns
from villi.cli.context import resolve
from villi.errors import ResourceError, StoreError, VilliError

SUFFIXES = (".yaml", ".yml", ".json")
PREFLIGHT_TIMEOUT = 2.5  # seconds to read the current state: a frozen kvstore fails here
COMMIT_TIMEOUT = 60.0  # one large transaction may take a while on a loaded etcd
CONFLICT_RETRIES = 3


class ApplyError(VilliError):
    """The apply failed; the message says whether anything was applied."""


def sources(names: Sequence[str], stdin: Any = None) -> list[tuple[str, str]]:
    """(name, text) of every source ``-f`` names: a file, a directory (its
    ``*.yaml``/``*.yml``/``*.json`` files in name order, not recursive) or ``-``."""
    from villi.policy.loader import read_file

    out: list[tuple[str, str]] = []
    for name in names:
        if name == "-":
            stream = stdin if stdin is not None else sys.stdin
            out.append(("<stdin>", stream.read()))
            continue
        path = Path(name)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
            if not files:
                raise ResourceError(f"directory has no {', '.join('*' + s for s in SUFFIXES)} "
                                    "files", file=name)
            out.extend((str(f), read_file(f)) for f in files)
        else:
            out.append((name, read_file(path)))
    return out


def load(names: Sequence[str], stdin: Any = None) -> list:
    """Validate every document of every source (policies, namespaces, services, pods)."""
    from villi.policy.loader import load_sources

    # one loader, one error format for every kind of the one registry
    return load_sources(sources(names, stdin), resources.all_kinds())


def _store_options(url: str) -> dict[str, Any]:
    if url.startswith(("http://", "https://", "etcd://", "unix://")) or "," in url:
        from villi.kvstore import BackoffPolicy

        # Fail fast: a CLI user wants "unreachable" in seconds, not after a minute.
        return {"request_timeout": COMMIT_TIMEOUT, "connect_timeout": 1.0,
                "backoff": BackoffPolicy(base=0.05, cap=0.5, max_attempts=3)}
    return {}


async def _current(store: Any, keys: list[str]) -> dict[str, Any]:
    """key → KeyValue (or None) for every key, read by listing their parents."""
    parents = sorted({k.rsplit("/", 1)[0] + "/" for k in keys})
    found: dict[str, Any] = {}
    for parent in parents:
        for kv in (await store.list(parent)).items:
            found[kv.key] = kv
    return {k: found.get(k) for k in keys}


class _Progress:
    """How far the commit got: what an interrupt message can promise.

    ``committing`` is set before the transaction is sent; ``committed`` once etcd
    answered it. An interrupt after the answer (while the store closes) must not
    claim that nothing was applied.
    """

    committing = False
    committed = False


async def _write(url: str, items: list, delete: bool,
                 progress: _Progress | None = None) -> list[str]:
    from villi.kvstore import TxnOp, open_store

    progress = progress or _Progress()

    where = f"kvstore {url}"
    async with open_store(url, **_store_options(url)) as store:
        keys = [resources.key_of(res) for res in items]
        for _attempt in range(CONFLICT_RETRIES):
            try:
                current = await asyncio.wait_for(_current(store, keys), PREFLIGHT_TIMEOUT)
            except (TimeoutError, StoreError) as exc:
                reason = str(exc) or f"no answer within {PREFLIGHT_TIMEOUT:g} s"
                raise ApplyError(f"{where} is not answering ({reason}); nothing was "
                                 "applied") from None
            extras: dict[str, str] = {}
            if not delete:
                extras = await _allocate_cluster_ips(store, items)
            ops: list[TxnOp] = []
            expect: dict[str, int] = {}
            done: list[str] = []
            for res, key in zip(items, keys, strict=True):
                old = current[key]
                expect[key] = old.mod_revision if old is not None else 0
                if delete:
                    if old is not None:
                        ops.append(TxnOp(key, None))
                    done.append(f"{_describe(res)} {'deleted' if old else 'not found'}")
                    continue
                raw = resources.encode(res)
                extra = extras.get(key, "")
                if old is not None and old.value == raw:
                    done.append(f"{_describe(res)} unchanged{extra}")
                    continue
                ops.append(TxnOp(key, raw))
                done.append(f"{_describe(res)} {'configured' if old else 'created'}{extra}")
            if not ops:
                if delete:  # claims left behind by an earlier, interrupted delete
                    await _release_cluster_ips(store, items)
                return done
            try:
                progress.committing = True
                revision = await store.commit(ops, expect)
                progress.committing = False
                progress.committed = revision is not None
            except StoreError as exc:
                raise ApplyError(f"{exc}; nothing was applied" if "unknown" not in str(exc)
                                 else f"{exc}: the transaction either applied completely "
                                 "or not at all; run the command again to be sure") from None
            if revision is not None:
                if delete:
                    await _release_cluster_ips(store, items)
                return done
        raise ApplyError(f"{where}: the resources kept changing while applying "
                         f"({CONFLICT_RETRIES} attempts); nothing was applied")
    raise AssertionError("unreachable")


async def _allocate_cluster_ips(store: Any, items: list) -> dict[str, str]:
    from villi.service.allocator import allocate_cluster_ip

    extras = {}
    for res in items:
        if res.kind == "Service":
            ip = await allocate_cluster_ip(store, res.namespace, res.metadata.name,
                                           res.spec.cluster_ip or None)
            extras[resources.key_of(res)] = f" (clusterIP {ip})"
    return extras


async def _release_cluster_ips(store: Any, items: list) -> None:
    from villi.service.allocator import release_cluster_ip

    for res in items:
        if res.kind == "Service":
            await release_cluster_ip(store, res.namespace, res.metadata.name)


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
    if not items:
        raise ResourceError("no resources found in " + ", ".join(args.filename))
    target = resolve(args.kvstore)
    progress = _Progress()
    try:
        with in_netns(target.kvstore_netns):
            lines = asyncio.run(_write(target.kvstore, items, delete, progress))
    except KeyboardInterrupt:
        if progress.committed:
            print("interrupted after the kvstore committed: everything was "
                  f"{'deleted' if delete else 'applied'}", file=sys.stderr)
        elif progress.committing:
            print("interrupted while the kvstore was committing: the transaction applied "
                  "completely or not at all; run the command again to be sure",
                  file=sys.stderr)
        else:
            print("interrupted: nothing was applied", file=sys.stderr)
        return 130
    for line in lines:
        print(line)
    return 0
